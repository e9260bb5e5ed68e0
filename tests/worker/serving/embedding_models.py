"""Tiny tenant embedding models for the serving tests: random LoRA factors on two layers of
the shared MiniLM (so a tenant's vectors differ from the base's), one encoder or separate
query and document encoders, max_length 32, packed with the training app's tar; and a few
documents and queries of the stackfaq slice in ../shared (read in place, never copied)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from apps.training.packaging import pack_dir
from worker import base_models
from worker.embeddings import write_embedder_dir

STACKFAQ = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "stackfaq"
MODULES = ("encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense")
RANK = 2


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    title: str


@dataclass(frozen=True)
class PackedEmbedder:
    model_dir: Path
    tar: Path
    sha256: str
    size: int


def stackfaq_documents(count: int, *, start: int = 0) -> list[Doc]:
    with (STACKFAQ / "documents.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[start : start + count]
    return [Doc(id=r["id"], text=r["text"], title=r.get("title", "")) for r in rows]


def stackfaq_queries(documents: list[Doc], count: int) -> list[str]:
    wanted = {d.id for d in documents}
    with (STACKFAQ / "test.csv").open(newline="") as fh:
        return [r["query"] for r in csv.DictReader(fh) if r["document_id"] in wanted][:count]


def _factors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in MODULES:
        inner = 384 if "attention" in module else 1536
        tensors[f"{module}.lora_A"] = torch.randn(RANK, inner, generator=generator) * 0.05
        tensors[f"{module}.lora_B"] = torch.randn(384, RANK, generator=generator) * 0.05
    return tensors


def tiny_embedder(directory: Path, *, seed: int, separate: bool) -> PackedEmbedder:
    base = base_models.MINILM_L6_EMBED
    meta = {
        "kind": "embedding",
        "format": "adapter",
        "base_model": base,
        "base": base_models.get(base).base,
        "base_sha256": base_models.base_sha256(base),
        "lora": {"r": RANK, "alpha": 4.0, "dropout": 0.0, "target_modules": list(MODULES)},
        "max_length": 32,
        "pooling": "mean",
        "separate": separate,
        "dim": 384,
        "document_fields": "title_text",
    }
    model_dir = directory / "model"
    write_embedder_dir(
        model_dir,
        meta=meta,
        query=_factors(seed),
        document=_factors(seed + 1000) if separate else None,
    )
    tar = directory / "model.tar"
    sha256, size = pack_dir(model_dir, tar)
    return PackedEmbedder(model_dir=model_dir, tar=tar, sha256=sha256, size=size)
