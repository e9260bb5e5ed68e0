from __future__ import annotations

import re
from typing import Any

from django import forms

from apps.campaigns.models import Trigger
from apps.promotions.models import Target


def _base_model_choices() -> list[tuple[str, str]]:
    from worker.base_models import catalogue

    return [(m.id, f"{m.id} — {m.kind}") for m in catalogue()]


class CampaignForm(forms.Form):
    """The campaign page's form; what it holds is checked by the API's own serializer."""

    name = forms.CharField(required=False, max_length=100)
    model_name = forms.CharField(max_length=100, help_text="retrained in every tenant")
    dataset = forms.CharField(
        required=False,
        max_length=100,
        help_text="each tenant's training dataset; blank: the model's name",
    )
    tenants = forms.CharField(
        required=False,
        initial="all",
        help_text='"all", or tenant slugs separated by spaces or commas; blank to use a domain',
    )
    domain = forms.CharField(required=False, max_length=50, help_text="every tenant of a domain")
    recipe = forms.ChoiceField(
        choices=[
            ("base", "This base model and params"),
            ("last", "Each tenant's last successful configuration"),
        ],
        initial="base",
        widget=forms.RadioSelect,
    )
    base_model = forms.ChoiceField(choices=(), required=False)
    epochs = forms.IntegerField(
        required=False, min_value=1, max_value=100, help_text="blank: the base's default"
    )
    learning_rate = forms.FloatField(required=False, help_text="blank: the base's default")
    target = forms.ChoiceField(choices=Target.choices, initial=Target.STAGING)
    trigger = forms.ChoiceField(choices=Trigger.choices, initial=Trigger.NOW)
    interval_seconds = forms.IntegerField(
        required=False, help_text="for a schedule: seconds between rounds"
    )
    weight = forms.IntegerField(
        initial=1, min_value=1, max_value=100, help_text="share of the training budget"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["base_model"].choices = _base_model_choices()  # type: ignore[attr-defined]

    def api_payload(self) -> dict[str, Any]:
        """The cleaned form as the REST API's body."""
        data = self.cleaned_data
        body: dict[str, Any] = {
            "name": data["name"],
            "model_name": data["model_name"],
            "dataset": data["dataset"],
            "target": data["target"],
            "trigger": data["trigger"],
            "weight": data["weight"] or 1,
        }
        tenants = data["tenants"].strip()
        if tenants == "all":
            body["tenants"] = "all"
        elif tenants:
            body["tenants"] = [s for s in re.split(r"[\s,]+", tenants) if s]
        if data["domain"]:
            body["domain"] = data["domain"]
        if data["interval_seconds"]:
            body["interval_seconds"] = data["interval_seconds"]
        if data["recipe"] == "last":
            body["recipe"] = "last"
        else:
            params = {
                name: data[name] for name in ("epochs", "learning_rate") if data[name] is not None
            }
            body["recipe"] = {"base_model": data["base_model"], "params": params}
        return body
