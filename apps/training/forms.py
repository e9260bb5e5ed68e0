"""Dashboard form for launching a run: the same rules at the door as the runs API.

Ranges are not repeated here: ``TrainConfig.validate()`` is their one source, and its
messages are attached to the fields they name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django import forms

from apps.datasets.models import DatasetKind, DatasetVersion
from apps.datasets.selectors import versions_for_tenant
from apps.tenants.models import Tenant
from worker.base_models import catalogue
from worker.training.config import TrainConfig

# The parameters the form offers; the rest of TrainConfig keeps its defaults.
FORM_PARAMS = (
    "epochs",
    "learning_rate",
    "batch_size",
    "max_length",
    "seed",
    "patience",
    "validation_split",
)
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"  # as the runs API accepts


def _default(name: str) -> Any:
    for item in dataclasses.fields(TrainConfig):
        if item.name == name:
            return item.default
    raise KeyError(name)


def _version_label(version: DatasetVersion) -> str:
    return f"v{version.number} · {version.rows:,} rows · {version.label_count} labels"


class RunLaunchForm(forms.Form):
    dataset_version = forms.ModelChoiceField(
        queryset=DatasetVersion.objects.none(),
        label="Training data",
        empty_label=None,
        help_text="A version of one of this tenant's training datasets.",
    )
    validation_version = forms.ModelChoiceField(
        queryset=DatasetVersion.objects.none(),
        required=False,
        label="Validation data",
        empty_label="Hold out a split of the training data",
    )
    base_model = forms.ChoiceField(choices=())
    model_name = forms.RegexField(
        regex=MODEL_NAME_PATTERN,
        required=False,
        max_length=100,
        error_messages={"invalid": "Use lowercase letters, digits, '.', '_' and '-'."},
        help_text="The registered model the result becomes a version of; "
        "empty: the dataset's name.",
        widget=forms.TextInput(attrs={"placeholder": "support-intents", "autocomplete": "off"}),
    )
    epochs = forms.IntegerField(initial=_default("epochs"))
    learning_rate = forms.FloatField(
        required=False,
        label="Learning rate",
        help_text="Empty: the base model's default (1e-3 for Tiny BERT, 5e-5 for MiniLM).",
    )
    batch_size = forms.IntegerField(initial=_default("batch_size"), label="Batch size")
    max_length = forms.IntegerField(
        initial=_default("max_length"), label="Max length", help_text="Tokens per text."
    )
    seed = forms.IntegerField(initial=_default("seed"))
    patience = forms.IntegerField(
        required=False,
        initial=_default("patience"),
        help_text="Stop after this many epochs without a better val_macro_f1; "
        "empty: never stop early.",
    )
    validation_split = forms.FloatField(
        initial=_default("validation_split"),
        label="Validation split",
        help_text="Share of the training rows held out per label (without validation data).",
    )

    def __init__(self, *args: Any, tenant: Tenant, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Any version of the tenant is accepted at the door so that the service can say why
        # a golden set is refused; the menus offer the training versions only.
        mine = versions_for_tenant(tenant=tenant)
        offered = list(
            mine.filter(dataset__kind=DatasetKind.TRAINING).order_by("dataset__name", "-number")
        )
        grouped: dict[str, list[tuple[str, str]]] = {}
        for version in offered:
            grouped.setdefault(version.dataset.name, []).append(
                (version.pk, _version_label(version))
            )
        choices: list[Any] = list(grouped.items())
        training = self.fields["dataset_version"]
        validation = self.fields["validation_version"]
        assert isinstance(training, forms.ModelChoiceField)
        assert isinstance(validation, forms.ModelChoiceField)
        training.queryset = mine
        validation.queryset = mine
        training.choices = choices
        validation.choices = [("", validation.empty_label), *choices]
        self.has_training_data = bool(offered)
        base = self.fields["base_model"]
        assert isinstance(base, forms.ChoiceField)
        base.choices = [(model.id, model.name) for model in catalogue()]
        self.params: dict[str, Any] = {}

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        given = {name: cleaned[name] for name in FORM_PARAMS if name in cleaned}
        if given.get("learning_rate") is None and "base_model" in cleaned:
            from worker.base_models import get

            given["learning_rate"] = get(cleaned["base_model"]).default_learning_rate
        if len(given) < len(FORM_PARAMS) or "base_model" not in cleaned:
            return cleaned  # a field already has its error; ranges are checked once it parses
        try:
            config = TrainConfig.from_dict({**given, "base_model": cleaned["base_model"]})
        except (TypeError, ValueError) as exc:
            raise forms.ValidationError(str(exc)) from None
        for name, message in config.validate().items():
            self.add_error(name if name in self.fields else None, message)
        resolved = config.to_dict()
        resolved.pop("base_model", None)
        self.params = resolved
        return cleaned
