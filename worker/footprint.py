"""How much memory a trained model needs to serve: what placement packs replicas by."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from worker.inference import load_classifier

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def measure_memory_bytes(
    model_dir: Path, sample_texts: list[str], *, device: str | None = None
) -> int:
    """Bytes the model in ``model_dir`` takes to load and answer one batch of ``sample_texts``.

    Method:

    - **CUDA**: reset the peak counter, load the model onto the GPU, predict one batch, and
      read ``torch.cuda.max_memory_allocated``: weights, activations and workspaces, not the
      CUDA context every process pays once whatever it serves.
    - **CPU**: the bytes of the parameters and buffers, plus the peak growth of the process's
      resident set while one batch runs (activations and scratch space). ``tracemalloc`` does
      not see torch's allocations, so the resident set is read from ``/proc/self/status``:
      one warm-up text first (so one-time library set-up is not charged to the model), then
      the high-water mark is reset (``/proc/self/clear_refs``, Linux) and the batch's peak
      is ``VmHWM`` minus the resident size before it. Where the mark cannot be reset, the
      resident size after the batch stands in, which misses memory already given back.
      Memory the allocator reuses is not counted again, so this is a lower bound that is
      floored at the weights' size; without ``/proc`` it is the weights' size alone.

    The batch is ``sample_texts`` whole: pass as many texts as serving will batch together.

    An adapter directory (:mod:`worker.adapters`) is its adapter and head tensors' bytes:
    the activations are the shared base's, and the base is counted once per replica. An
    autocomplete directory (:mod:`worker.autocomplete`) completes the texts as prefixes.
    """
    if not sample_texts:
        raise ValueError("measure_memory_bytes needs at least one sample text")
    from worker import adapters, autocomplete, embeddings

    if autocomplete.is_completer_dir(model_dir):
        return _completer_bytes(model_dir, sample_texts, device)
    if embeddings.is_embedder_dir(model_dir):
        # An embedding model is LoRA on the shared base too: its own tensors alone.
        return embeddings.embedder_bytes(model_dir)
    if adapters.is_adapter_dir(model_dir):
        # What the tenant adds to a replica that already holds the shared base: the
        # adapter and head tensors. The base is counted once per replica, by placement.
        return adapters.adapter_bytes(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        classifier = load_classifier(model_dir, device=device)
        classifier.predict(sample_texts, batch_size=len(sample_texts))
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        del classifier
        torch.cuda.empty_cache()
        return peak

    classifier = load_classifier(model_dir, device="cpu")
    tensors = [*classifier.model.parameters(), *classifier.model.buffers()]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    classifier.predict(sample_texts[:1])
    gc.collect()
    before = _status_bytes("VmRSS")
    peak_was_reset = _reset_peak_resident()
    classifier.predict(sample_texts, batch_size=len(sample_texts))
    after = _status_bytes("VmHWM" if peak_was_reset else "VmRSS")
    if before is None or after is None:
        return weight_bytes
    return weight_bytes + max(0, after - before)


def _completer_bytes(model_dir: Path, prefixes: list[str], device: str | None) -> int:
    """An autocomplete model: its weights, plus (CPU) the resident growth while it completes
    ``prefixes`` as one greedy batch, or (CUDA) the peak allocated while it does; the
    key/value cache is part of that peak."""
    from worker.autocomplete import load_completer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    requests = [(prefix, "") for prefix in prefixes]
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        completer = load_completer(model_dir, device=device)
        completer.complete_batch(requests)
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        del completer
        torch.cuda.empty_cache()
        return peak
    completer = load_completer(model_dir, device="cpu")
    tensors = [*completer.model.parameters(), *completer.model.buffers()]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    completer.complete_batch(requests[:1])
    gc.collect()
    before = _status_bytes("VmRSS")
    peak_was_reset = _reset_peak_resident()
    completer.complete_batch(requests)
    after = _status_bytes("VmHWM" if peak_was_reset else "VmRSS")
    if before is None or after is None:
        return weight_bytes
    return weight_bytes + max(0, after - before)


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where there is no ``/proc``."""
    try:
        lines = PROC_STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _reset_peak_resident() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0); False if not allowed."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
