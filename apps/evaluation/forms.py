"""Dashboard form for a promotion policy: gates as rows, then the policy-wide limits."""

from __future__ import annotations

from typing import Any

from django import forms

from apps.evaluation.services import GATE_METRICS, GATE_OPS, SCORE_METRICS

MAX_GATES = 5


class GateForm(forms.Form):
    # A blank first choice, so that an untouched spare row submits as empty and is skipped.
    metric = forms.ChoiceField(choices=[("", "—"), *((m, m) for m in GATE_METRICS)])
    op = forms.ChoiceField(choices=[("", "—"), *((o, o) for o in GATE_OPS)])
    value = forms.FloatField()
    dataset = forms.ChoiceField(required=False)

    def __init__(
        self,
        *args: Any,
        datasets: list[tuple[str, str]],
        metrics: tuple[str, ...] = GATE_METRICS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["dataset"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [("", "every evaluated dataset"), *datasets]
        metric = self.fields["metric"]
        assert isinstance(metric, forms.ChoiceField)
        metric.choices = [("", "—"), *((m, m) for m in metrics)]

    def clean_value(self) -> float:
        value = self.cleaned_data["value"]
        metric = self.cleaned_data.get("metric")
        if metric in SCORE_METRICS and not 0.0 <= value <= 1.0:
            raise forms.ValidationError("A score is between 0 and 1.")
        if value < 0:
            raise forms.ValidationError("Must not be negative.")
        return float(value)

    def gate(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "metric": data["metric"],
            "op": data["op"],
            "value": data["value"],
            "dataset": data.get("dataset") or None,
        }


class BaseGateFormSet(forms.BaseFormSet):  # type: ignore[type-arg]
    def gates(self) -> list[dict[str, Any]]:
        gates: list[dict[str, Any]] = []
        for form in self.forms:
            # An untouched spare row has no cleaned data; a ticked "remove" drops the gate.
            if not form.cleaned_data or form.cleaned_data.get("DELETE"):
                continue
            assert isinstance(form, GateForm)
            gates.append(form.gate())
        return gates


def gate_formset(
    *,
    data: Any = None,
    initial: list[dict[str, Any]],
    datasets: list[tuple[str, str]],
    metrics: tuple[str, ...] = GATE_METRICS,
) -> BaseGateFormSet:
    extra = max(1, MAX_GATES - len(initial)) if len(initial) < MAX_GATES else 0
    factory = forms.formset_factory(
        GateForm,
        formset=BaseGateFormSet,
        extra=extra,
        max_num=MAX_GATES,
        validate_max=True,
        can_delete=True,
    )
    # Bound, the submitted rows are the whole truth: no initial to compare them with.
    formset = factory(
        data,
        initial=None if data is not None else initial,
        prefix="gates",
        form_kwargs={"datasets": datasets, "metrics": metrics},
    )
    assert isinstance(formset, BaseGateFormSet)
    return formset


class PolicyForm(forms.Form):
    max_regression_vs_champion = forms.FloatField(
        required=False,
        min_value=0.0,
        max_value=1.0,
        help_text="How far macro-F1 (a classifier), recall@1, recall@5, MRR@10 and nDCG@10 "
        "(an embedding model) or next-word top-1 (an autocomplete model) may fall below the "
        "production model's on the same sets; with none in production an embedding model is "
        "held to its un-tuned base, an autocomplete model to the tenant's word trigram.",
    )
    latency_budget_ms = forms.FloatField(
        required=False,
        min_value=0.0,
        help_text="p95 latency per batch (an autocomplete model: per generated token), in "
        "milliseconds.",
    )
    require_staging_before_production = forms.BooleanField(required=False)
    trainer_may_approve = forms.BooleanField(
        required=False,
        help_text="Unticked (the default): whoever launched a version's training run cannot "
        "approve its promotion.",
    )
