"""The on-disk shape of a trained classifier, and turning texts into model inputs.

A model directory holds what ``save_pretrained`` writes (``config.json`` and
``model.safetensors``), the tokenizer's files, and ``labels.json`` mapping class ids (as
strings) to labels. Training writes it, serving and evaluation read it: this module is the
one place both sides agree on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

LABELS_FILE = "labels.json"

# Worker and fleet processes log to files: tqdm bars for every save and load are noise there.
transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def save_model_dir(
    directory: Path,
    *,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    labels: list[str],
) -> None:
    """Write model (safetensors), tokenizer and labels into ``directory`` (created); an
    adapter model writes only what the tenant adds (see :mod:`worker.adapters`)."""
    from worker import adapters

    if isinstance(model, adapters.AdapterClassifier):
        adapters.save_adapter_dir(directory, model, labels)
        return
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    mapping = {str(index): label for index, label in enumerate(labels)}
    (directory / LABELS_FILE).write_text(json.dumps(mapping, indent=1, ensure_ascii=False))


def read_labels(directory: Path) -> list[str]:
    mapping = json.loads((directory / LABELS_FILE).read_text())
    return [mapping[str(index)] for index in range(len(mapping))]


def load_model_dir(
    directory: Path, *, device: str = "cpu"
) -> tuple[Any, PreTrainedTokenizerBase, list[str]]:
    """Load what :func:`save_model_dir` wrote (trainable); never reaches a model hub."""
    from worker import adapters

    if adapters.is_adapter_dir(directory):
        model, adapter_tokenizer, labels = adapters.load_adapter_classifier(directory)
        model.to(device)
        return model, adapter_tokenizer, labels
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, local_files_only=True, use_safetensors=True
    )
    model.to(device)
    return model, tokenizer, read_labels(directory)


def artifact_format(directory: Path) -> dict[str, Any]:
    """What the registry records of a model directory's format: ``{"format": "full"}``, or
    for an adapter (a classifier's or an embedding model's) its base (catalogue id, weights
    sha256, the bytes a replica holds once)."""
    from worker import adapters, embeddings

    if embeddings.is_embedder_dir(directory):
        meta = embeddings.read_meta(directory)
    elif adapters.is_adapter_dir(directory):
        meta = adapters.read_meta(directory)
    else:
        return {"format": "full"}
    base_model = str(meta["base_model"])
    return {
        "format": "adapter",
        "base_model": base_model,
        "base_sha256": str(meta["base_sha256"]),
        "base_memory_bytes": adapters.base_memory_bytes(base_model),
    }


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, special tokens included."""
    if not texts:
        return []
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]


def collate(ids: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row: ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
