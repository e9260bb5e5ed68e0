from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.db.models import QuerySet
from django.utils import timezone

from apps.datasets.models import Dataset
from apps.datasets.selectors import version_lookup


class AccessRequestForm(forms.Form):
    dataset = forms.ChoiceField(label="Dataset")
    version = forms.IntegerField(
        label="Version", required=False, min_value=1, help_text="empty: every version"
    )
    purpose = forms.CharField(
        label="Purpose",
        min_length=5,
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="what you will do with the data; the reviewer reads this",
    )

    def __init__(self, *args: Any, datasets: QuerySet[Dataset], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datasets = {d.pk: d for d in datasets}
        self.fields["dataset"].choices = [("", "Choose a dataset")] + [  # type: ignore[attr-defined]
            (d.pk, f"{d.name} ({d.kind})") for d in self.datasets.values()
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        dataset = self.datasets.get(data.get("dataset") or "")
        if dataset is None:
            return data
        data["dataset"] = dataset
        number = data.pop("version", None)
        data["dataset_version"] = None
        if number is not None:
            version = version_lookup(dataset=dataset, ref=str(number))
            if version is None:
                self.add_error("version", f"'{dataset.name}' has no version {number}.")
            data["dataset_version"] = version
        return data


class AccessDecisionForm(forms.Form):
    decision = forms.ChoiceField(
        choices=[("grant", "Grant"), ("deny", "Deny"), ("revoke", "Revoke")]
    )
    comment = forms.CharField(required=False, max_length=5000)
    days = forms.IntegerField(
        label="Valid for (days)", required=False, min_value=1, max_value=3650,
        help_text="empty: until revoked",
    )  # fmt: skip

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        days = data.get("days")
        data["expires_at"] = timezone.now() + timedelta(days=days) if days else None
        return data
