"""Dashboard forms for datasets: the same rules at the door as the API's serializers."""

from __future__ import annotations

from django import forms

from apps.datasets.models import DatasetKind, DatasetVersion, Task


class DatasetCreateForm(forms.Form):
    name = forms.RegexField(
        regex=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$",
        max_length=100,
        error_messages={"invalid": "Use letters, digits, spaces, '.', '_' and '-'."},
        widget=forms.TextInput(attrs={"placeholder": "support-intents", "autocomplete": "off"}),
    )
    kind = forms.ChoiceField(
        choices=DatasetKind.choices,
        initial=DatasetKind.TRAINING,
        help_text="Golden and sample sets decide promotions: only reviewers and admins "
        "create and change them.",
    )
    task = forms.ChoiceField(choices=Task.choices, initial=Task.TEXT_CLASSIFICATION)
    domain = forms.RegexField(
        regex=r"^[a-z0-9-]{0,50}$",
        required=False,
        max_length=50,
        error_messages={"invalid": "Use lowercase letters, digits and '-'."},
        widget=forms.TextInput(attrs={"placeholder": "banking"}),
    )
    description = forms.CharField(
        required=False, max_length=5000, widget=forms.Textarea(attrs={"rows": 2})
    )


class VersionUploadForm(forms.Form):
    file = forms.FileField(help_text="CSV with a header row, or JSON lines; UTF-8.")
    text_column = forms.CharField(max_length=100, required=False, initial="text")
    label_column = forms.CharField(max_length=100, required=False, initial="label")
    format = forms.ChoiceField(
        choices=[("", "Detect from the file"), *DatasetVersion.Format.choices],
        required=False,
    )

    def clean_text_column(self) -> str:
        return str(self.cleaned_data["text_column"]).strip() or "text"

    def clean_label_column(self) -> str:
        return str(self.cleaned_data["label_column"]).strip() or "label"

    def clean_format(self) -> str | None:
        return str(self.cleaned_data["format"]) or None
