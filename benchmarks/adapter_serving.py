"""Serving tenants' LoRA adapters on one shared base: density, mixed-tenant throughput and
cold load, on the replica's own code path, against full MiniLM copies and single-tenant
batches.

    .venv/bin/python benchmarks/adapter_serving.py           # full: ~10 min
    .venv/bin/python benchmarks/adapter_serving.py --quick   # CI smoke: ~2 min

Trains one adapter with the worker's training loop and the catalogue's defaults for
``minilm-l6-lora`` (LoRA r 8, alpha 16 on query/value, max_length 64, 77 banking77 labels;
one epoch on 3 rows per label: the shape is what matters here), derives distinct tenants
from it (``adapter_variant``: the LoRA factors and the head perturbed, same shape, other
bytes), packs each with the training app's deterministic tar, and measures:

* **density**, each side in a fresh subprocess that loads tars with
  :func:`worker.serving.loading.load_model` onto the CPU and keeps what it returns, as a
  replica does: the resident memory (``VmRSS``, after ``gc.collect()``) each additional
  tenant model adds, with 1,000 and with 10,000 adapters held on one base (target
  ≤ 0.5 MB each), against 10 full ``minilm-l6`` classifiers (``worker.training.base.build``
  + ``worker.modeling.save_model_dir``, heads perturbed so that every copy has its own
  bytes). The first model of each side is not counted: it brings the shared base (or the
  architecture's template), held once;
* **mixed-tenant throughput**, in this process: one :func:`worker.adapters.predict_mixed`
  call of 32 requests (one banking77 test text each) from 32 tenants (A) against one call
  of 32 requests to one tenant (B, as the replica's batcher hands them over) and, for
  context, one request of the same 32 texts to one tenant (C: the single-adapter path),
  interleaved A B C, requests/s (target A ≥ 0.8x B; vLLM's multi-LoRA: ~0.66x). A's
  predictions are checked against each tenant's own request alone;
* **adapter cold load** into this running process (the base already held):
  ``load_model(tar_uri, sha256)`` of distinct adapter tars in the page cache against
  ``Path.read_bytes`` of the same tar, interleaved per tenant, p50 / p99 (target ≤ 5 ms p50).

A replica runs exactly ``loading.load_model`` and ``adapters.predict_mixed`` inside Ray;
Ray's hop is measured by ``serving_memory.py`` and ``predict_latency.py``. torch runs one
intra-op thread, as a replica does (Ray gives its ``num_cpus=0.5`` actors
``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _serving
from benchmarks._common import ROOT

DATA = ROOT.parent / "shared" / "datasets" / "banking77"
TARGET_MB = 0.5
TARGET_RATIO = 0.8
TARGET_LOAD_MS = 5.0
BATCH = 32
REPLICA_BUDGET = 512 * 1024**2  # PoolSpec.replica_memory_bytes' default
MB = 1e6
TEXTS = ["I lost my phone", "what exchange rate do you use?", "how old must I be"]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def hold(request: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: load every tar as a replica does, keep the models, and report
    the resident memory before the first, after it and at each checkpoint."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertModel  # noqa: F401

    from worker.serving import loading

    torch.set_num_threads(1)
    tars: list[list[str]] = request["tars"]
    checkpoints = set(request["checkpoints"])
    gc.collect()
    before = rss_bytes()  # imports done: what the process costs without a model
    held = [loading.load_model(*tars[0], device="cpu").classifier]
    gc.collect()
    first = rss_bytes()
    points: dict[int, int] = {}
    started = time.perf_counter()
    for uri, sha256 in tars[1:]:
        held.append(loading.load_model(uri, sha256, device="cpu").classifier)
        if len(held) - 1 in checkpoints:
            gc.collect()
            points[len(held) - 1] = rss_bytes()
    load_s = time.perf_counter() - started
    predictions = [held[0].predict(TEXTS), held[-1].predict(TEXTS)]
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    return {
        "before": before,
        "first": first,
        "points": points,
        "peak": peak,
        "weight_bytes": held[-1].weight_bytes,
        "load_s": load_s,
        "differ": predictions[0] != predictions[1],
    }


def measure_in_subprocess(
    work: Path, name: str, tars: Sequence[Any], checkpoints: list[int]
) -> dict[str, Any]:
    request = work / f"{name}.json"
    request.write_text(
        json.dumps({"tars": [[t.tar.as_uri(), t.sha256] for t in tars], "checkpoints": checkpoints})
    )
    out = subprocess.run(
        [sys.executable, __file__, "--hold", str(request)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{name} subprocess failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["points"] = {int(n): rss for n, rss in result["points"].items()}
    return result


def banking77_labels() -> list[str]:
    with (DATA / "train.csv").open(encoding="utf-8-sig", newline="") as handle:
        return sorted({row["category"] for row in csv.DictReader(handle)})


def test_texts(count: int) -> list[str]:
    """``count`` banking77 test texts spread over the file (so over the labels)."""
    with (DATA / "test.csv").open(encoding="utf-8-sig", newline="") as handle:
        rows = [row["text"] for row in csv.DictReader(handle)]
    return rows[:: len(rows) // count][:count]


def train_default_adapter(work: Path, labels: list[str]) -> Path:
    """One adapter of the default shape, trained by the worker's loop (1 epoch, 3 rows per
    label: enough to be a trained adapter; its quality is adapter_training.py's subject)."""
    from tests.worker.conftest import Recorder, tiny_config, write_slice
    from worker import base_models
    from worker.training.config import DataSpec
    from worker.training.loop import train

    work.mkdir(parents=True)
    data = write_slice(work / "slice.csv", labels, 3)
    defaults = base_models.get(base_models.MINILM_L6_LORA).defaults()
    config = tiny_config(
        base_model=base_models.MINILM_L6_LORA, **{**defaults, "epochs": 1, "seed": 13}
    )
    result = train(
        config,
        DataSpec(path=data, text_column="text", label_column="category", format="csv"),
        validation_data=None,
        work_dir=work / "run",
        callbacks=Recorder(),
    )
    return result.model_dir


def full_minilm(work: Path, labels: list[str]) -> Path:
    """A full ``minilm-l6`` classifier for ``labels`` as training builds and saves one
    (untrained head: its size is what matters)."""
    import torch

    from worker import base_models
    from worker.modeling import save_model_dir
    from worker.training.base import build

    torch.manual_seed(0)
    model, tokenizer = build(base_models.MINILM_L6, texts=TEXTS, labels=labels, max_length=64)
    save_model_dir(work, model=model, tokenizer=tokenizer, labels=labels)
    return work


def tenants(model_dir: Path, work: Path, count: int, *, adapter: bool) -> list[Any]:
    """``count`` packed tenants derived from ``model_dir`` (only the tars are kept)."""
    from tests.worker.serving.models import adapter_variant, pack, variant

    work.mkdir(parents=True)
    packed = []
    for i in range(count):
        target = work / "model"
        if adapter:
            adapter_variant(model_dir, target, seed=i)
        else:
            variant(model_dir, target, seed=i)
        packed.append(pack(target, work / f"{i}.tar"))
        shutil.rmtree(target)
    return packed


def throughput(models: list[Any], texts: list[str], reps: int) -> dict[str, Any]:
    """Interleaved A B C reps of one predict_mixed call each; seconds per call."""
    import torch

    from worker import adapters

    sides = {
        "A": [(model, [text]) for model, text in zip(models, texts, strict=True)],
        "B": [(models[0], [text]) for text in texts],
        "C": [(models[0], texts)],
    }
    # Mixed-tenant predictions are each tenant's own, alone.
    mixed = adapters.predict_mixed(sides["A"])
    for (model, request), got in zip(sides["A"], mixed, strict=True):
        alone = adapters.predict_mixed([(model, request)])[0]
        assert [p["label"] for p in got] == [p["label"] for p in alone]
        assert all(
            math.isclose(g["score"], a["score"], abs_tol=1e-4)
            for g, a in zip(got, alone, strict=True)
        )
    one = [p["label"] for r in adapters.predict_mixed(sides["B"]) for p in r]
    assert one == [p["label"] for p in adapters.predict_mixed(sides["C"])[0]]
    distinct = len({p[0]["label"] for p in mixed})
    for side in sides.values():  # warm-up
        adapters.predict_mixed(side)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, side in sides.items():
            started = time.perf_counter()
            adapters.predict_mixed(side)
            seconds[name].append(time.perf_counter() - started)
    # Where A's extra time goes: the per-row factors gathered for the pass, measured apart.
    base = models[0].base
    row_adapter = torch.arange(len(models))
    select_ms = []
    for _ in range(reps):
        started = time.perf_counter()
        base._select(
            [m.adapter for m in models], row_adapter
        )  # private: measured apart, as the profile would
        select_ms.append((time.perf_counter() - started) * 1000)
        for layer in base.layers.values():
            layer.rows, layer.shared = None, False
    return {"seconds": seconds, "select_ms": select_ms, "distinct_labels": distinct}


def cold_load(packed: list[Any]) -> dict[str, list[float]]:
    """Interleaved per tenant: load_model (A), read_bytes (B); then where A goes."""
    from worker import adapters
    from worker.serving import loading

    timings: dict[str, list[float]] = {
        "load": [],
        "read": [],
        "fetch + sha256": [],
        "tar members": [],
        "build": [],
    }
    held = []  # a running replica keeps what it loads
    for tenant in packed:
        tenant.tar.read_bytes()  # page cache, for both sides alike
        gc.collect()
        started = time.perf_counter()
        loaded = loading.load_model(tenant.tar.as_uri(), tenant.sha256, device="cpu")
        timings["load"].append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        data = tenant.tar.read_bytes()
        timings["read"].append((time.perf_counter() - started) * 1000)
        held.append(loaded.classifier)
        started = time.perf_counter()
        loading.verify_sha256(loading.fetch_bytes(tenant.tar.as_uri()), tenant.sha256)
        timings["fetch + sha256"].append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        loading.read_members(data, (), adapters.ADAPTER_MEMBERS)
        timings["tar members"].append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        loading.build_classifier(data, device="cpu")
        timings["build"].append((time.perf_counter() - started) * 1000)
    assert all(model.predict(TEXTS) for model in held)
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    parser = _serving.parser(
        __doc__ or "", quick_help="100 adapters, 3 full copies, 5 reps, 30 loads"
    )
    parser.add_argument("--hold", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold:  # the density subprocess
        print(json.dumps(hold(json.loads(args.hold.read_text()))))
        return 0
    counts = [100] if args.quick else [1000, 10000]
    copies = 3 if args.quick else 10
    reps = 5 if args.quick else 30
    loads = 30 if args.quick else 300
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="adapter-serving-"))
    try:
        import torch

        from worker.serving import loading

        labels = banking77_labels()
        clock = time.perf_counter()
        print("training one adapter (the catalogue's defaults) ...", flush=True)
        adapter_dir = train_default_adapter(work / "adapter", labels)
        train_s = time.perf_counter() - clock
        print(f"{copies + 1} full minilm-l6 copies ...", flush=True)
        full = tenants(
            full_minilm(work / "full", labels), work / "fulls", copies + 1, adapter=False
        )
        print(f"{counts[-1] + 1} adapters ...", flush=True)
        clock = time.perf_counter()
        packed = tenants(adapter_dir, work / "adapters", counts[-1] + 1, adapter=True)
        make_s = time.perf_counter() - clock
        print("density: full copies, then adapters, each in a fresh process ...", flush=True)
        load_density = os.getloadavg()[0]
        full_side = measure_in_subprocess(work, "full", full, [copies])
        adapter_side = measure_in_subprocess(work, "adapters", packed, counts)

        print("mixed-tenant throughput ...", flush=True)
        torch.set_num_threads(1)
        load_throughput = os.getloadavg()[0]
        models = [
            loading.load_model(t.tar.as_uri(), t.sha256, device="cpu").classifier
            for t in packed[:BATCH]
        ]
        texts = test_texts(BATCH)
        speed = throughput(models, texts, reps)
        print("adapter cold load ...", flush=True)
        load_cold = os.getloadavg()[0]
        cold = cold_load(packed[BATCH : BATCH + loads])
        load_end = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from worker import adapters, base_models

    per_full = (full_side["points"][copies] - full_side["first"]) / copies
    base_resident = adapter_side["first"] - adapter_side["before"]
    rows = []
    per_adapter = {}
    for n in counts:
        per_adapter[n] = (adapter_side["points"][n] - adapter_side["first"]) / n
        rows.append(
            [
                f"resident memory per additional tenant model, {n:,} adapters held on one "
                "base (MB)",
                f"{per_adapter[n] / MB:.3f}",
                f"full minilm-l6 copy ({copies} held after the first): {per_full / MB:.1f}",
                f"{per_full / per_adapter[n]:.0f}x less",
                f"≤ {TARGET_MB} MB",
                "yes" if per_adapter[n] <= TARGET_MB * MB else "no",
            ]
        )
    densest = per_adapter[counts[-1]]
    # The base's weights are memory-mapped: only the pages its tokens touch are resident yet,
    # so the budget counts the whole file, as placement does (base_memory_bytes).
    base_bytes = adapters.base_memory_bytes(base_models.MINILM_L6_LORA)
    fit_adapters = int((REPLICA_BUDGET - base_bytes) // densest)
    fit_full = int(REPLICA_BUDGET // per_full)
    rows.append(
        [
            "tenant models in a 512 MiB replica budget",
            f"{fit_adapters:,} adapters (the base's {base_bytes / MB:.1f} MB once, then "
            f"{densest / MB:.3f} MB each)",
            f"{fit_full} full copies",
            f"{fit_adapters / max(fit_full, 1):.0f}x",
            "-",
            "-",
        ]
    )
    sec = speed["seconds"]
    rate = {name: [BATCH / s for s in values] for name, values in sec.items()}
    ratio_b = [b / a for a, b in zip(sec["A"], sec["B"], strict=True)]
    ratio_c = [c / a for a, c in zip(sec["A"], sec["C"], strict=True)]
    ratio_met = statistics.median(ratio_b) >= TARGET_RATIO
    rows += [
        [
            f"mixed-tenant throughput: {BATCH} requests from {BATCH} tenants in one "
            "predict_mixed call (requests/s)",
            _serving.med(rate["A"], "{:.1f}"),
            f"{BATCH} requests to one tenant, one call: " + _serving.med(rate["B"], "{:.1f}"),
            _serving.med(ratio_b) + "x",
            f"≥ {TARGET_RATIO}x",
            "yes" if ratio_met else "no",
        ],
        [
            "the same, against one request of the 32 texts to one tenant (requests/s)",
            _serving.med(rate["A"], "{:.1f}"),
            "one tenant, one request of 32 texts: " + _serving.med(rate["C"], "{:.1f}"),
            _serving.med(ratio_c) + "x",
            "-",
            "-",
        ],
    ]
    p50, p99 = statistics.median, _serving.percentile
    load_met = p50(cold["load"]) <= TARGET_LOAD_MS
    rows.append(
        [
            "adapter cold load into a running process (base held), p50 / p99 (ms)",
            f"{p50(cold['load']):.2f} / {p99(cold['load'], 99):.2f}",
            f"read its bytes {p50(cold['read']):.3f} / {p99(cold['read'], 99):.3f}",
            f"{p50(cold['load']) / p50(cold['read']):.0f}x (p50)",
            f"≤ {TARGET_LOAD_MS:.0f} ms (p50)",
            "yes" if load_met else "no",
        ]
    )
    density_met = all(v <= TARGET_MB * MB for v in per_adapter.values())
    notes = [
        "in-process, on the replica's own code path: a replica runs exactly "
        "`worker.serving.loading.load_model` and `worker.adapters.predict_mixed` inside Ray; "
        "Ray's hop is measured by serving_memory.py and predict_latency.py",
        f"the adapter: the catalogue's defaults for minilm-l6-lora (r 8, alpha 16, query/value, "
        f"max_length 64, 77 banking77 labels), trained by the worker's loop for 1 epoch on 3 rows "
        f"per label ({train_s:.0f} s); {counts[-1] + 1:,} tenants derived from it (factors and "
        f"head perturbed), {packed[0].size:,} bytes per tar, made in {make_s:.0f} s; full "
        f"copies: `build('minilm-l6')` + `save_model_dir`, heads perturbed, {full[0].size:,} "
        "bytes per tar",
        "density: each side in a fresh subprocess loading the tars with `load_model` onto the "
        "CPU and keeping the models; VmRSS after `gc.collect()`; per additional model = "
        "(RSS with N more held - RSS after the first) / N; the first model brings the shared "
        f"base (adapters: +{base_resident / MB:.0f} MB over the process with its imports: its "
        f"{base_bytes / MB:.1f} MB safetensors are memory-mapped, only the pages touched so far "
        "are resident; the budget row counts the whole file) or "
        f"the architecture's template (full: +{(full_side['first'] - full_side['before']) / MB:.0f}"
        " MB); MB = 10^6 bytes",
        f"an adapter's tensors: {adapter_side['weight_bytes']:,} bytes (what `memory_bytes` "
        f"counts); a full copy's parameters: {full_side['weight_bytes']:,} bytes; peak RSS of "
        f"the subprocesses: adapters {adapter_side['peak'] / MB:.0f} MB, full "
        f"{full_side['peak'] / MB:.0f} MB; {counts[-1]:,} adapter loads took "
        f"{adapter_side['load_s']:.1f} s",
        f"throughput: {BATCH} banking77 test texts, one per request; {reps} reps per side after "
        f"a warm-up, interleaved A B C; {sum(sec['A']):.1f} s of A; ratios per rep; the mixed "
        f"batch predicts {speed['distinct_labels']} distinct labels and each tenant's rows "
        "equal that tenant's request alone (label, score within 1e-4); B is what the replica's "
        "batcher passes for 32 requests to one model (one item per request), C the "
        "single-adapter path; `SharedBase._select` for 32 adapters, measured apart: p50 "
        f"{p50(speed['select_ms']):.2f} ms of A's p50 {p50(sec['A']) * 1000:.0f} ms",
        f"cold load: {loads} distinct adapter tars, each read once first (page cache), "
        "interleaved A B per tenant, the models kept; where the load goes, p50 (ms), measured "
        "apart: "
        + ", ".join(f"{k} {p50(cold[k]):.2f}" for k in ("fetch + sha256", "tar members", "build"))
        + " (build: members, JSON, safetensors, Adapter)",
        f"1-minute load average: start {load_start:.2f}, density {load_density:.2f}, "
        f"throughput {load_throughput:.2f}, cold load {load_cold:.2f}, end {load_end:.2f} "
        "(the machine is shared)",
        "torch intra-op threads: 1 (as in a replica: Ray sets OMP_NUM_THREADS=1 for its "
        "num_cpus=0.5 actors)",
        *_serving.machine_facts(" (everything on the CPU)"),
    ]
    assert full_side["differ"] and adapter_side["differ"], "derived tenants predict alike"
    _serving.finish(_serving.entry("adapter_serving", _serving.table(rows), notes), args)
    return 0 if density_met and ratio_met and load_met else 1


if __name__ == "__main__":
    sys.exit(main())
