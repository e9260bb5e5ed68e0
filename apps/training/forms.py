"""Dashboard form for launching a run: the same rules at the door as the runs API.

Ranges are not repeated here: ``TrainConfig.validate()`` is their one source, and its
messages are attached to the fields they name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django import forms

from apps.datasets.models import DatasetKind, DatasetVersion, Task
from apps.datasets.selectors import versions_for_tenant
from apps.tenants.models import Tenant
from apps.training.params import params_resolve
from worker import base_models
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
# Left empty, these take the chosen base model's default (patience: empty means never stop).
BASE_DEFAULTED = ("epochs", "learning_rate", "batch_size", "max_length")
BASE_DEFAULT_HELP = "Empty: the base model's default."
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"  # as the runs API accepts


def _default(name: str) -> Any:
    for item in dataclasses.fields(TrainConfig):
        if item.name == name:
            return item.default
    raise KeyError(name)


def _version_label(version: DatasetVersion) -> str:
    if version.documents_storage_key:  # retrieval pairs and their knowledge base
        return f"v{version.number} · {version.rows:,} pairs · {version.documents_count} documents"
    if version.dataset.task == Task.TEXT_GENERATION:
        return f"v{version.number} · {version.rows:,} replies"
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
    epochs = forms.IntegerField(required=False, help_text=BASE_DEFAULT_HELP)
    learning_rate = forms.FloatField(
        required=False,
        label="Learning rate",
        help_text="Empty: the base model's default (1e-3 for Tiny BERT, 5e-5 for MiniLM, "
        "2e-3 for the LoRA adapter, 3e-4 for the embedding adapter).",
    )
    batch_size = forms.IntegerField(required=False, label="Batch size", help_text=BASE_DEFAULT_HELP)
    max_length = forms.IntegerField(
        required=False,
        label="Max length",
        help_text=f"Tokens per text. Empty: the base model's default ({_default('max_length')}; "
        "256 for the embedding base, whose documents are longer).",
    )
    seed = forms.IntegerField(initial=_default("seed"))
    patience = forms.IntegerField(
        required=False,
        initial=_default("patience"),
        help_text="Stop after this many epochs without a better val_macro_f1 (an embedding "
        "model: val_mrr_at_10; an autocomplete model: a lower val_loss); empty: never stop "
        "early.",
    )
    validation_split = forms.FloatField(
        initial=_default("validation_split"),
        label="Validation split",
        help_text="Share of the training rows held out per label (without validation data).",
    )
    # LoRA: adapter base models only; ignored for a full base (it would refuse them).
    lora_r = forms.IntegerField(
        required=False, label="LoRA rank", help_text=f"Adapter bases only. {BASE_DEFAULT_HELP}"
    )
    lora_alpha = forms.FloatField(
        required=False,
        label="LoRA alpha",
        help_text=f"The update is scaled by alpha / rank. {BASE_DEFAULT_HELP}",
    )
    lora_dropout = forms.FloatField(
        required=False, label="LoRA dropout", help_text=BASE_DEFAULT_HELP
    )
    lora_target_modules = forms.MultipleChoiceField(
        required=False,
        label="LoRA target modules",
        choices=[(name, name) for name in base_models.LORA_TARGET_MODULES],
        widget=forms.CheckboxSelectMultiple,
        help_text=f"The modules of each layer the adapter adapts. {BASE_DEFAULT_HELP}",
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
        base.initial = base_models.default_base_model()
        # Which bases take the LoRA fields (the launch page's script hides them for others).
        base.widget.attrs["data-adapter-bases"] = " ".join(
            model.id for model in catalogue() if model.format == base_models.FORMAT_ADAPTER
        )
        # Which bases take the separate-encoders choice (the script hides it for others).
        self.embedding_bases = " ".join(
            model.id for model in catalogue() if model.kind == base_models.KIND_EMBEDDING
        )
        # And which take init_from.
        self.autocomplete_bases = " ".join(
            model.id for model in catalogue() if model.kind == base_models.KIND_AUTOCOMPLETE
        )
        self.params: dict[str, Any] = {}

    init_from = forms.ChoiceField(
        required=False,
        label="Start from",
        choices=[
            ("", "The base model's default (scratch)"),
            ("scratch", "Scratch: a vocabulary learnt on these replies"),
            ("pretrained", "The pretrained causal LM installed on the workers"),
        ],
        help_text="Autocomplete bases only. Pretrained needs WORKBENCH_CAUSAL_LM_PATH.",
    )

    separate_encoders = forms.BooleanField(
        required=False,
        label="Separate query and document encoders",
        help_text="Embedding bases only: two adapters, one for queries and one for documents.",
    )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        offered = (*FORM_PARAMS, *base_models.LORA_PARAMS)
        if "base_model" not in cleaned or any(name in self.errors for name in offered):
            return cleaned  # a field already has its error; ranges are checked once it parses
        base = cleaned["base_model"]
        given = {name: cleaned.get(name) for name in FORM_PARAMS}
        for name in BASE_DEFAULTED:
            if given[name] is None:
                del given[name]  # the base's default, then TrainConfig's
        if base_models.get(base).format == base_models.FORMAT_ADAPTER:
            for name in base_models.LORA_PARAMS:
                if cleaned.get(name) not in (None, []):
                    given[name] = cleaned[name]
        if cleaned.get("separate_encoders"):
            given["separate_encoders"] = True  # a classifier base refuses it, by name
        if cleaned.get("init_from"):
            given["init_from"] = cleaned["init_from"]  # only autocomplete bases take it
        resolved, problems = params_resolve(base_model=base, given=given)
        for name, message in problems.items():
            self.add_error(name if name in self.fields else None, message)
        self.params = resolved
        return cleaned
