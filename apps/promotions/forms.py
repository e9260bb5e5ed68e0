"""Dashboard forms for promotion requests and reviewer decisions."""

from __future__ import annotations

from typing import Any

from django import forms

from apps.promotions.models import Target
from apps.registry.models import ModelVersion
from apps.tenants.models import Tenant

COMMENT_MAX = 2000


class VersionChoiceField(forms.ModelChoiceField):  # type: ignore[type-arg]
    def label_from_instance(self, obj: Any) -> str:
        stage = f" · {obj.stage}" if obj.stage and obj.stage != "none" else ""
        return f"{obj.registered_model.name} v{obj.number}{stage}"


class PromotionRequestForm(forms.Form):
    model_version = VersionChoiceField(
        queryset=ModelVersion.objects.none(), empty_label="Choose a model version…"
    )
    target = forms.ChoiceField(choices=Target.choices, initial=Target.STAGING)

    def __init__(self, *args: Any, tenant: Tenant, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["model_version"]
        assert isinstance(field, forms.ModelChoiceField)
        field.queryset = (
            ModelVersion.objects.filter(registered_model__tenant=tenant)
            .select_related("registered_model")
            .order_by("registered_model__name", "-number")
        )


class DecisionForm(forms.Form):
    comment = forms.CharField(
        required=False, max_length=COMMENT_MAX, widget=forms.Textarea(attrs={"rows": 2})
    )
