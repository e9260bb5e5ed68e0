"""Tiny tenant models for the serving tests and benchmarks: trained with the worker's own
training loop on a banking77 slice, packed with the training app's deterministic tar."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from apps.training.packaging import pack_dir
from tests.worker.conftest import LABELS, Recorder, tiny_config, write_slice
from worker.serving.specs import ModelSpec
from worker.training.config import DataSpec
from worker.training.loop import train


@dataclass(frozen=True)
class PackedModel:
    model_dir: Path
    tar: Path
    sha256: str
    size: int

    def spec(
        self, model_id: str, *, memory_bytes: int | None = None, pinned: bool = True
    ) -> ModelSpec:
        return ModelSpec(
            model_id=model_id,
            artifact_uri=self.tar.as_uri(),
            sha256=self.sha256,
            memory_bytes=memory_bytes if memory_bytes is not None else 4 * self.size,
            pinned=pinned,
        )


def train_tiny(
    work_dir: Path, *, seed: int, labels: list[str] = LABELS, per_label: int = 20, epochs: int = 1
) -> Path:
    """A tiny BERT trained for one epoch on ``per_label`` banking77 rows per label."""
    work_dir.mkdir(parents=True, exist_ok=True)
    data = write_slice(work_dir / "slice.csv", labels, per_label)
    result = train(
        tiny_config(epochs=epochs, seed=seed),
        DataSpec(path=data, text_column="text", label_column="category", format="csv"),
        validation_data=None,
        work_dir=work_dir / "run",
        callbacks=Recorder(),
    )
    return result.model_dir


def pack(model_dir: Path, tar: Path) -> PackedModel:
    sha256, size = pack_dir(model_dir, tar)
    return PackedModel(model_dir=model_dir, tar=tar, sha256=sha256, size=size)


def variant(model_dir: Path, target: Path, *, seed: int, noise: float = 0.05) -> Path:
    """A copy of ``model_dir`` whose classifier head is perturbed: another tenant's model
    of the same shape, with its own bytes and predictions, without training it."""
    shutil.copytree(model_dir, target)
    weights = load_file(str(target / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    head = weights["classifier.weight"]
    weights["classifier.weight"] = head + noise * torch.randn(head.shape, generator=generator)
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def train_adapter(work_dir: Path, *, seed: int, labels: list[str] = LABELS[:4]) -> Path:
    """A small LoRA adapter on the shared MiniLM (rank 4, 1 epoch on 12 rows per label)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    data = write_slice(work_dir / "slice.csv", labels, 12)
    config = tiny_config(
        base_model="minilm-l6-lora",
        epochs=1,
        seed=seed,
        learning_rate=3e-3,
        batch_size=16,
        max_length=32,
        lora_r=4,
        lora_alpha=8.0,
        lora_dropout=0.1,
        lora_target_modules=["query", "value"],
    )
    result = train(
        config,
        DataSpec(path=data, text_column="text", label_column="category", format="csv"),
        validation_data=None,
        work_dir=work_dir / "run",
        callbacks=Recorder(),
    )
    return result.model_dir


def adapter_variant(
    model_dir: Path, target: Path, *, seed: int, rank: int | None = None, **meta: object
) -> Path:
    """Another tenant's adapter on the same base, without training it: the LoRA factors
    and the head perturbed, the rank cut to ``rank`` when given, ``meta`` overriding
    ``adapter.json`` (e.g. another ``base_sha256``)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(model_dir / "adapter.safetensors"))
    config = json.loads((model_dir / "adapter.json").read_text())
    r = rank or int(config["r"])
    changed = {}
    for name, tensor in tensors.items():
        if name.endswith("lora_A"):
            tensor = tensor[:r]
        elif name.endswith("lora_B"):
            tensor = tensor[:, :r]
        noise = 0.5 if name.startswith("head.") else 0.05
        changed[name] = (
            tensor + noise * torch.randn(tensor.shape, generator=generator)
        ).contiguous()
    target.mkdir(parents=True)
    save_file(changed, str(target / "adapter.safetensors"))
    alpha = float(config["alpha"]) * r / int(config["r"])
    (target / "adapter.json").write_text(json.dumps({**config, "r": r, "alpha": alpha, **meta}))
    shutil.copyfile(model_dir / "labels.json", target / "labels.json")
    return target


def narrower(model_dir: Path, target: Path, *, keep: int) -> Path:
    """A copy of ``model_dir`` that knows only its first ``keep`` labels: a tenant with
    another head shape (the loader's templates must not care)."""
    shutil.copytree(model_dir, target)
    weights = load_file(str(target / "model.safetensors"))
    weights["classifier.weight"] = weights["classifier.weight"][:keep].clone()
    weights["classifier.bias"] = weights["classifier.bias"][:keep].clone()
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    labels = labels_of(model_dir)[:keep]
    id2label = {str(index): label for index, label in enumerate(labels)}
    (target / "labels.json").write_text(json.dumps(id2label))
    config = json.loads((target / "config.json").read_text())
    config["id2label"] = id2label
    config["label2id"] = {label: index for index, label in enumerate(labels)}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def labels_of(model_dir: Path) -> list[str]:
    mapping = json.loads((model_dir / "labels.json").read_text())
    return [mapping[str(i)] for i in range(len(mapping))]
