"""What a training run is asked to do: plain dataclasses, checked, serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker import base_models

DATA_FORMATS = ("csv", "jsonl")


@dataclass
class TrainConfig:
    """The full, resolved hyper-parameters of one run (recorded with the run as-is)."""

    base_model: str
    epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0
    # Stop when val_macro_f1 (an embedding run: val_mrr_at_10) has not improved for this many
    # epochs; None: never stop early.
    patience: int | None = None
    # Share of the training rows held out (per label) when no validation file is given.
    validation_split: float = 0.1
    # A mid-epoch checkpoint comes at every checkpoint_every_steps-th step, but no sooner
    # than checkpoint_min_seconds after the previous one (0: the step count alone). Each is a
    # snapshot, a write and an upload: at 50 steps alone a small model paid ~3 % of its steps
    # for them, and a resume redoes at most a minute of work. Every epoch end checkpoints.
    checkpoint_every_steps: int = 50
    checkpoint_min_seconds: float = 60.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    # Gradients are clipped to this global norm; 0 turns clipping off.
    grad_clip: float = 1.0
    # One train_loss metric point (the mean since the previous one) every this many steps.
    log_every_steps: int = 10
    # LoRA, for adapter base models only (None for full ones; an adapter run left at None
    # gets its catalogue entry's default): rank, scaling alpha (the update is scaled by
    # alpha / r), dropout on the adapter's input, and the modules of each layer it adapts.
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_target_modules: list[str] | None = None
    # Embedding base models only: separate query and document encoders (two adapters, one
    # model), and how a document's title and text make the text it is embedded as (None:
    # the catalogue entry's default; see base_models.DOCUMENT_FIELDS).
    separate_encoders: bool = False
    document_fields: str | None = None
    # Autocomplete base models only: "scratch" or "pretrained" (base_models.INIT_FROM; None:
    # the catalogue entry's default).
    init_from: str | None = None

    def is_autocomplete(self) -> bool:
        try:
            return base_models.get(self.base_model).kind == base_models.KIND_AUTOCOMPLETE
        except base_models.UnknownBaseModel:
            return False

    def resolved_init_from(self) -> str:
        if self.init_from is not None:
            return self.init_from
        return str(base_models.get(self.base_model).defaults().get("init_from", "scratch"))

    def is_embedding(self) -> bool:
        try:
            return base_models.get(self.base_model).kind == base_models.KIND_EMBEDDING
        except base_models.UnknownBaseModel:
            return False

    def resolved_document_fields(self) -> str:
        if self.document_fields is not None:
            return self.document_fields
        return str(base_models.get(self.base_model).defaults()["document_fields"])

    def lora(self) -> dict[str, Any]:
        """The LoRA parameters with the base model's defaults for those left at None."""
        defaults = base_models.get(self.base_model).defaults()
        return {
            name: getattr(self, name) if getattr(self, name) is not None else defaults[name]
            for name in base_models.LORA_PARAMS
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from ``to_dict`` output; unknown keys are an error, missing ones default."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training parameters: {', '.join(unknown)}")
        return cls(**data)

    def validate(self) -> dict[str, str]:
        """Field name -> message for every out-of-range value; empty when all is well."""
        errors: dict[str, str] = {}
        try:
            base_models.get(self.base_model)
        except base_models.UnknownBaseModel:
            known = ", ".join(model.id for model in base_models.catalogue())
            errors["base_model"] = f"Unknown base model; choose one of: {known}."

        def check_int(name: str, value: Any, low: int, high: int | None) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                errors[name] = "Must be an integer."
            elif value < low or (high is not None and value > high):
                errors[name] = (
                    f"Must be between {low} and {high}."
                    if high is not None
                    else f"Must be >= {low}."
                )

        def check_float(name: str, value: Any, low: float, high: float, *, low_open: bool) -> None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                errors[name] = "Must be a number."
            elif (value <= low if low_open else value < low) or value > high:
                bracket = "(" if low_open else "["
                errors[name] = f"Must be in {bracket}{low}, {high}]."

        check_int("epochs", self.epochs, 1, 100)
        check_float("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        check_int("batch_size", self.batch_size, 1, 1024)
        check_int("max_length", self.max_length, 8, 512)
        check_int("seed", self.seed, 0, 2**32 - 1)
        if self.patience is not None:
            check_int("patience", self.patience, 1, 50)
        check_float("validation_split", self.validation_split, 0.0, 0.5, low_open=True)
        check_int("checkpoint_every_steps", self.checkpoint_every_steps, 1, None)
        check_float(
            "checkpoint_min_seconds", self.checkpoint_min_seconds, 0.0, 86_400.0, low_open=False
        )
        check_float("weight_decay", self.weight_decay, 0.0, 1.0, low_open=False)
        check_float("warmup_ratio", self.warmup_ratio, 0.0, 0.5, low_open=False)
        check_float("grad_clip", self.grad_clip, 0.0, 100.0, low_open=False)
        check_int("log_every_steps", self.log_every_steps, 1, 10_000)
        self._validate_lora(errors, check_int, check_float)
        self._validate_embedding(errors)
        self._validate_autocomplete(errors)
        return errors

    def _validate_autocomplete(self, errors: dict[str, str]) -> None:
        if not self.is_autocomplete():
            if self.init_from is not None:
                errors["init_from"] = (
                    f"Only autocomplete base models take init_from; {self.base_model!r} is not one."
                )
            return
        if self.init_from is None:
            return
        if self.init_from not in base_models.INIT_FROM:
            errors["init_from"] = f"Must be one of: {', '.join(base_models.INIT_FROM)}."
        elif self.init_from == "pretrained":
            try:
                base_models.causal_lm_path()
            except base_models.BaseModelUnavailable as error:
                errors["init_from"] = f"{error}."

    def _validate_embedding(self, errors: dict[str, str]) -> None:
        if not isinstance(self.separate_encoders, bool):
            errors["separate_encoders"] = "Must be true or false."
        if not self.is_embedding():
            for name in base_models.EMBEDDING_PARAMS:
                if getattr(self, name) not in (None, False):
                    errors[name] = (
                        f"Only embedding base models take {name}; "
                        f"{self.base_model!r} is a classifier."
                    )
            return
        fields = self.document_fields
        if fields is not None and fields not in base_models.DOCUMENT_FIELDS:
            errors["document_fields"] = f"Must be one of: {', '.join(base_models.DOCUMENT_FIELDS)}."

    def _validate_lora(self, errors: dict[str, str], check_int: Any, check_float: Any) -> None:
        try:
            entry = base_models.get(self.base_model)
        except base_models.UnknownBaseModel:
            return
        if entry.format != base_models.FORMAT_ADAPTER:
            for name in base_models.LORA_PARAMS:
                if getattr(self, name) is not None:
                    errors[name] = (
                        "Only adapter base models take LoRA parameters; "
                        f"{self.base_model!r} is fine-tuned whole."
                    )
            return
        if self.lora_r is not None:
            check_int("lora_r", self.lora_r, 1, 256)
        if self.lora_alpha is not None:
            check_float("lora_alpha", self.lora_alpha, 0.0, 4096.0, low_open=True)
        if self.lora_dropout is not None:
            check_float("lora_dropout", self.lora_dropout, 0.0, 0.9, low_open=False)
        modules = self.lora_target_modules
        if modules is not None:
            known = base_models.LORA_TARGET_MODULES
            if (
                not isinstance(modules, list)
                or not modules
                or not all(isinstance(m, str) for m in modules)
            ):
                errors["lora_target_modules"] = (
                    f"Must be a non-empty list of module names: {', '.join(known)}."
                )
            elif unknown := sorted(set(modules) - set(known)):
                errors["lora_target_modules"] = (
                    f"Unknown module(s) {', '.join(unknown)}; choose from: {', '.join(known)}."
                )
            elif len(set(modules)) != len(modules):
                errors["lora_target_modules"] = "Name each module once."


@dataclass
class DataSpec:
    """Where a table of labelled texts lies and which columns hold the text and the label."""

    path: Path
    text_column: str
    label_column: str
    format: str = "csv"  # one of DATA_FORMATS; the reader refuses any other
    # Retrieval data: text_column holds the query, label_column the document id, and the
    # knowledge base (columns id, text, optional title) lies here.
    documents_path: Path | None = None
    documents_format: str = "csv"

    def to_dict(self) -> dict[str, Any]:
        data = {**dataclasses.asdict(self), "path": str(self.path)}
        if self.documents_path is not None:
            data["documents_path"] = str(self.documents_path)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        documents = data.get("documents_path")
        return cls(
            **{
                **data,
                "path": Path(data["path"]),
                "documents_path": Path(documents) if documents is not None else None,
            }
        )
