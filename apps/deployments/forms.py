"""The deployments list's filters (GET): environment, status, model."""

from __future__ import annotations

from typing import Any

from django import forms

from apps.deployments.models import DeploymentStatus, Environment

ANY = ("", "Any")


class DeploymentFilterForm(forms.Form):
    environment = forms.ChoiceField(choices=[ANY, *Environment.choices], required=False)
    status = forms.ChoiceField(choices=[ANY, *DeploymentStatus.choices], required=False)
    model = forms.ChoiceField(choices=[ANY], required=False)

    def __init__(self, *args: Any, model_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["model"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [ANY, *((name, name) for name in model_names)]

    def lookups(self) -> dict[str, str]:
        """The ORM filters of the valid, non-empty fields (an invalid one filters nothing:
        its error is shown next to it)."""
        self.is_valid()
        data = getattr(self, "cleaned_data", {})
        names = {
            "environment": "environment",
            "status": "status",
            "model": "model_version__registered_model__name",
        }
        return {names[k]: v for k, v in data.items() if k in names and v}
