"""Dashboard forms for datasets: the same rules at the door as the API's serializers."""

from __future__ import annotations

from typing import Any

from django import forms

from apps.datasets.models import DatasetKind, DatasetVersion, Task, default_columns


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
    task = forms.ChoiceField(
        choices=Task.choices,
        initial=Task.TEXT_CLASSIFICATION,
        help_text="Retrieval: each version is queries paired with the id of the document that "
        "answers them, uploaded with that knowledge base. Text generation: each version is "
        "agent replies, each with the customer message it answers (optional), for "
        "autocomplete models.",
    )
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
    documents = forms.FileField(
        required=False,
        label="Documents",
        help_text="The knowledge base the pairs point into: CSV or JSON lines with the "
        "columns id, text and optionally title.",
    )
    text_column = forms.CharField(max_length=100, required=False, initial="text")
    label_column = forms.CharField(max_length=100, required=False, initial="label")
    context_column = forms.CharField(
        max_length=100,
        required=False,
        initial="context",
        label="Context column",
        help_text="The message each reply answers; taken when the file has this column "
        "(leave it as it is for replies without context).",
    )
    format = forms.ChoiceField(
        choices=[("", "Detect from the file"), *DatasetVersion.Format.choices],
        required=False,
    )
    documents_format = forms.ChoiceField(
        choices=[("", "Detect from the file"), *DatasetVersion.Format.choices],
        required=False,
        label="Documents format",
    )

    def __init__(self, *args: Any, task: str = Task.TEXT_CLASSIFICATION, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task = task
        self.default_columns = default_columns(task)
        text_field, label_field = self.fields["text_column"], self.fields["label_column"]
        text_field.initial, label_field.initial = self.default_columns
        if task == Task.RETRIEVAL:
            self.fields["file"].label = "Pairs"
            self.fields["file"].help_text = (
                "One row per query and the id of the document that answers it: CSV with a "
                "header row, or JSON lines; UTF-8."
            )
            self.fields["documents"].required = True
            text_field.label, label_field.label = "Query column", "Document id column"
        else:  # only retrieval versions have a knowledge base
            del self.fields["documents"], self.fields["documents_format"]
        if task == Task.TEXT_GENERATION:
            self.fields["file"].label = "Replies"
            self.fields["file"].help_text = (
                "One agent reply per row (column text) and, optionally, the customer message "
                "it answers (column context): CSV with a header row, or JSON lines; UTF-8."
            )
            text_field.label = "Reply column"
            del self.fields["label_column"]  # a reply corpus has no labels
        else:  # only reply corpora have a context
            del self.fields["context_column"]

    def clean_text_column(self) -> str:
        return str(self.cleaned_data["text_column"]).strip() or self.default_columns[0]

    def clean_label_column(self) -> str:
        return str(self.cleaned_data["label_column"]).strip() or self.default_columns[1]

    def clean_context_column(self) -> str | None:
        # Left at (or cleared to) the default: "context" when the file has it, none else;
        # another name is a column the file must have.
        name = str(self.cleaned_data["context_column"]).strip()
        return None if name in ("", self.default_columns[1]) else name

    def clean_format(self) -> str | None:
        return str(self.cleaned_data["format"]) or None

    def clean_documents_format(self) -> str | None:
        return str(self.cleaned_data["documents_format"]) or None
