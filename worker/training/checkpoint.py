"""Writing and reading training checkpoints.

A checkpoint directory holds::

    model/               current weights (safetensors), tokenizer, labels.json
    best/                the best epoch's model so far, same layout (absent before epoch 1 ends)
    training_state.pt    optimizer, LR scheduler, grad scaler, RNG states, loop state, config

``training_state.pt`` holds only tensors and plain Python values, so it loads back with
``torch.load(weights_only=True)``: a checkpoint from the artifact store is untrusted input and
must not unpickle arbitrary objects.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "training_state.pt"
FORMAT = 1


@dataclass
class LoopState:
    """Where the loop is: saved in every checkpoint, restored on resume."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    step: int = 0  # global optimizer steps
    best_metric: float = -1.0  # best val_macro_f1 so far; -1 before the first validation
    best_epoch: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    epochs_without_improvement: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    stop_reason: str = ""  # set once early stopping decided
    stop_detail: str = ""


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class Schedule:
    """When the loop writes a mid-epoch checkpoint.

    At every ``every_steps``-th global step, once ``min_seconds`` have passed since the
    previous checkpoint (or since training started in this process). ``clock`` is injectable
    so tests need not sleep.
    """

    def __init__(
        self, every_steps: int, min_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every_steps, self.min_seconds, self.clock = every_steps, min_seconds, clock
        self.last = clock()

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 and self.clock() - self.last >= self.min_seconds

    def written(self) -> None:
        self.last = self.clock()


def detached_copy(value: Any) -> Any:
    """``value`` (nested dicts, lists, tuples) with every tensor copied to the CPU.

    A state dict holds the live tensors the next optimizer step overwrites; the copy is
    what the checkpoint's writer, on another thread, serialises.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: detached_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(detached_copy(item) for item in value)
    return value


def stage(work_dir: Path, *, step: int, best_dir: Path) -> Path:
    """Start the checkpoint of ``step``: a fresh directory with ``best/`` linked in.

    Runs on the training thread, which replaces ``best_dir`` at epoch ends: the links pin
    the best model of this moment. :func:`complete` fills in the rest, on any thread.
    """
    building = work_dir / f"checkpoint.{step}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    if best_dir.is_dir():
        copy_tree(best_dir, building / "best")
    return building


def complete(
    work_dir: Path, building: Path, *, save_model: Callable[[Path], None], state: dict[str, Any]
) -> Path:
    """Write the model and ``state`` into ``building`` and swap it in as ``work_dir/checkpoint``.

    ``save_model(directory)`` writes the model directory. The checkpoint is built beside
    the old one and swapped in by rename, so a crash mid-write leaves the previous checkpoint
    whole. Returns the checkpoint's path.
    """
    final, old = work_dir / "checkpoint", work_dir / "checkpoint.old"
    save_model(building / "model")
    torch.save({"format": FORMAT, **state}, building / STATE_FILE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    building.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint (no {STATE_FILE})")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
    return state


def copy_tree(source: Path, destination: Path) -> None:
    """Copy a model directory, hard-linking files where the filesystem allows.

    Links are safe because model directories are written once, into a fresh directory, and
    never modified in place afterwards.
    """

    def link_or_copy(src: str, dst: str) -> object:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return dst

    shutil.copytree(source, destination, copy_function=link_or_copy)
