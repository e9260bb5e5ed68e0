"""Memory of 100 and of 1,000 tenant models served by the fleet, against one
``mlflow models serve`` process per model; and the fleet's predict round trip.

    .venv/bin/python benchmarks/serving_memory.py           # full: 100 and 1,000 models
    .venv/bin/python benchmarks/serving_memory.py --quick   # CI smoke: 10 models

Trains one tiny BERT on a banking77 slice (the worker's loop, 1 epoch) and derives distinct
tenants from it (perturbed classifier heads: same shape, other bytes, other predictions),
each packed with the training app's deterministic tar; its ``memory_bytes`` is measured as
registration does (``worker.footprint.measure_memory_bytes``, a batch of 16 texts).

* Reference: the same model as an MLflow pyfunc (``worker.inference.Classifier`` inside),
  served by ``mlflow models serve --env-manager local --workers 1``; after one warm-up
  request its process tree's peak RSS (sampled every 0.1 s for 3 s) is the cost of one
  model. N models served that way cost N times that: one real server measured, multiplied.
  Measured several times, interleaved with the fleet runs.
* Project: a fresh private Ray head (``worker.serving.local_ray``; 4 logical CPUs), a
  ``RayFleet`` applying N pinned models (one pool; replica budget 4 GiB, so 1,000 tiny
  models need one or two replica sets; one replica per set), waiting until every replica
  has loaded them, then one prediction per model. The peak of the summed RSS of the head's
  whole process tree (GCS, raylet, Ray workers, the Serve controller, the replicas) is
  sampled every 0.25 s from before the apply to after the last prediction. The driver (this
  process; the web process in production) is not counted.

RSS sums count shared pages (torch's libraries in every replica) once per process: an
overstatement of the fleet. PSS is printed beside it.

Then, on the N=100 fleet, the predict round trip from this driver process
(``RayFleet.predict``: straight to a replica actor, the default, or through Serve's
DeploymentHandle) against the bare forward pass of the same model in this process (one
text; A B interleaved; 300 each after a warm-up; torch on one thread, as in a replica),
with the pool's batching wait (2 ms) and after a re-apply with none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _serving
from benchmarks._common import free_port, process_tree

GIB = 1024**3
SAMPLE_TEXTS = [
    "I lost my phone, what do I do?",
    "What exchange rate do you use for euros?",
    "How old do you have to be to open an account?",
    "I want to close my account",
]
TARGETS = {100: 0.95, 1000: 0.99}


def _status_kib(pid: int, field_name: str) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


@dataclass
class TreeSampler:
    """Peak of the summed RSS (and PSS at that moment) of ``root``'s process tree."""

    root: int
    interval_s: float = 0.25
    peak_rss: int = 0
    peak_pss: int = 0
    processes_at_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        pids = process_tree(self.root)
        rss = sum(_status_kib(pid, "VmRSS") for pid in pids) * 1024
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.peak_pss = sum(_pss_kib(pid) for pid in pids) * 1024
            self.processes_at_peak = len(pids)

    def __enter__(self) -> TreeSampler:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self.sample()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def measure_mlflow(model_dir: Path, work: Path, rep: int) -> tuple[int, int, float]:
    """(peak RSS, peak PSS, ready seconds) of one ``mlflow models serve`` of the model."""
    from benchmarks import _mlflow_classifier

    saved = work / f"mlflow-model-{rep}"
    if not saved.exists():
        _mlflow_classifier.save(model_dir, saved)
    port = free_port()
    log = (work / f"mlflow-serve-{rep}.log").open("wb")
    # mlflow execs ``uvicorn`` from PATH: this interpreter's bin directory first.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{_serving.ROOT}:{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(saved),
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/ping", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            if process.poll() is not None or time.monotonic() - started > 180:
                raise RuntimeError((work / f"mlflow-serve-{rep}.log").read_text()[-3000:])
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        body = json.dumps({"dataframe_split": {"columns": ["text"],
                                               "data": [[t] for t in SAMPLE_TEXTS]}})  # fmt: skip
        request = urllib.request.Request(
            f"{url}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert len(json.loads(response.read())["predictions"]) == len(SAMPLE_TEXTS)
        sampler = TreeSampler(process.pid, interval_s=0.1)
        with sampler:
            time.sleep(3)
        return sampler.peak_rss, sampler.peak_pss, ready_s
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@dataclass
class FleetRun:
    models: int
    peak_rss: int
    peak_pss: int
    processes: int
    replicas: int
    replica_rss: list[int]
    load_ms: list[float]
    apply_s: float
    ready_s: float
    latency: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


def measure_fleet(
    packed: list[Any], memory_bytes: int, work: Path, *, latency_reps: int
) -> FleetRun:
    from worker.serving import local_ray
    from worker.serving.fleet import RayFleet
    from worker.serving.loading import load_model
    from worker.serving.specs import PoolSpec

    n = len(packed)
    head = local_ray.start_head(
        temp_dir=local_ray.short_temp_dir(f"bench-{os.getpid()}-{n}-{time.time()}"),
        log_path=work / f"ray-{n}.log",
        num_cpus=4,
    )
    try:
        local_ray.use_head_auth(head)
        fleet = RayFleet(address=head.address, namespace="bench", local_dir=work / "fleet")
        pool = PoolSpec(replica_memory_bytes=4 * GIB, max_sets=4, max_replicas=1)
        specs = [p.spec(f"tenant-{i:04d}", memory_bytes=memory_bytes) for i, p in enumerate(packed)]
        ids = [s.model_id for s in specs]
        with TreeSampler(head.pid) as sampler:
            started = time.monotonic()
            fleet.apply(pool, specs)
            applied = time.monotonic()
            ready = fleet.wait_ready("classifier", ids, timeout_s=1800)
            assert all(v is None for v in ready.values()), ready
            ready_s = time.monotonic() - started
            for model_id in ids:
                assert fleet.predict("classifier", model_id, SAMPLE_TEXTS[:1]).outputs
            time.sleep(2)  # the replicas' next statistics push
            status = fleet.status()
        (pool_status,) = status["pools"]
        replicas = [r for s in pool_status["sets"] for r in s["replicas"]]
        run = FleetRun(
            models=n,
            peak_rss=sampler.peak_rss,
            peak_pss=sampler.peak_pss,
            processes=sampler.processes_at_peak,
            replicas=len(replicas) + len(pool_status["tail"]["replicas"]),
            replica_rss=[r["rss_bytes"] for r in replicas],
            load_ms=[m["load_ms"] for r in replicas for m in r["models"]],
            apply_s=applied - started,
            ready_s=ready_s,
        )
        if latency_reps:
            import torch

            torch.set_num_threads(1)
            bare = load_model(packed[0].tar.as_uri(), packed[0].sha256).classifier
            by_handle = RayFleet(
                address=head.address, namespace="bench", local_dir=work / "fleet", direct=False
            )
            settings = [
                ("direct to the replica (default), batching wait 2 ms (pool default)",
                 fleet, None),
                ("through Serve's DeploymentHandle, batching wait 2 ms", by_handle, None),
                ("direct to the replica, no batching wait", fleet, 0.0),
            ]  # fmt: skip
            for label, client, wait in settings:
                if wait is not None:
                    fleet.apply(replace(pool, batch_wait_timeout_s=wait), specs)
                    fleet.wait_ready("classifier", ids, timeout_s=600)
                for _ in range(50):
                    client.predict("classifier", ids[0], SAMPLE_TEXTS[:1])
                    bare.predict(SAMPLE_TEXTS[:1])
                fleet_ms, bare_ms = [], []
                for _ in range(latency_reps):
                    result = client.predict("classifier", ids[0], SAMPLE_TEXTS[:1])
                    fleet_ms.append(result.latency_ms)
                    started = time.perf_counter()
                    bare.predict(SAMPLE_TEXTS[:1])
                    bare_ms.append((time.perf_counter() - started) * 1000)
                run.latency[label] = (fleet_ms, bare_ms)
        fleet.shutdown_pool("classifier")
        return run
    finally:
        import ray

        from worker.serving.fleet import close_all

        close_all()  # Serve's handle threads would log their failures at exit
        with contextlib.suppress(Exception):
            ray.shutdown()
        local_ray.stop_head(head.pid)
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def fleet_in_child(manifest: Path, n: int, memory_bytes: int, latency_reps: int) -> FleetRun:
    """Run :func:`measure_fleet` in a fresh interpreter: each fleet gets its own Ray
    driver state (Serve's driver-side singletons do not survive a reconnect)."""
    out = manifest.with_name(f"fleet-{n}.json")
    subprocess.run(
        [sys.executable, "-m", "benchmarks.serving_memory", "--child", str(manifest),
         "--child-models", str(n), "--child-memory-bytes", str(memory_bytes),
         "--child-latency-reps", str(latency_reps), "--child-out", str(out)],
        cwd=_serving.ROOT, check=True,
    )  # fmt: skip
    data = json.loads(out.read_text())
    data["latency"] = {k: tuple(v) for k, v in data["latency"].items()}
    return FleetRun(**data)


def child(args: Any) -> int:
    from tests.worker.serving.models import PackedModel

    entries = json.loads(Path(args.child).read_text())[: args.child_models]
    packed = [
        PackedModel(model_dir=Path(e["model_dir"]), tar=Path(e["tar"]), sha256=e["sha256"],
                    size=e["size"])
        for e in entries
    ]  # fmt: skip
    work = Path(args.child).parent
    run = measure_fleet(packed, args.child_memory_bytes, work, latency_reps=args.child_latency_reps)
    Path(args.child_out).write_text(json.dumps(asdict(run)))
    return 0


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _serving.parser(__doc__ or "", quick_help="10 models, 1 reference rep")
    parser.add_argument("--sizes", help="comma-separated model counts (default 100,1000)")
    for name in ("child", "child-out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("child-models", "child-memory-bytes", "child-latency-reps"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    sizes = [int(s) for s in (args.sizes or ("10" if args.quick else "100,1000")).split(",")]
    from tests.worker.serving.models import pack, variant
    from worker.footprint import measure_memory_bytes

    work = Path(tempfile.mkdtemp(prefix="serving-memory-"))
    try:
        print("training one tiny BERT ...", flush=True)
        base = _serving.tiny_tenant_model(work)
        memory_bytes = measure_memory_bytes(base, SAMPLE_TEXTS * 4, device="cpu")
        print(f"measured memory_bytes: {memory_bytes:,}; packing {max(sizes)} tenants ...")
        packed = [pack(variant(base, work / f"t{i}", seed=i), work / f"t{i}.tar")
                  for i in range(max(sizes))]  # fmt: skip
        tar_bytes = packed[0].size
        manifest = work / "tenants.json"
        manifest.write_text(json.dumps([
            {"model_dir": str(p.model_dir), "tar": str(p.tar), "sha256": p.sha256,
             "size": p.size} for p in packed
        ]))  # fmt: skip
        reference: list[tuple[int, int, float]] = []
        runs: list[FleetRun] = []
        load_start = os.getloadavg()[0]
        reference.append(measure_mlflow(base, work, 0))
        print(f"mlflow models serve: {gib(reference[-1][0])} GiB", flush=True)
        for n in sizes:
            # The round trip is measured on the first (smallest) fleet.
            reps = 0 if args.quick or runs else 300
            runs.append(fleet_in_child(manifest, n, memory_bytes, reps))
            print(f"fleet, {n} models: {gib(runs[-1].peak_rss)} GiB", flush=True)
            if not args.quick:
                reference.append(measure_mlflow(base, work, len(reference)))
                print(f"mlflow models serve: {gib(reference[-1][0])} GiB", flush=True)
        load_end = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one = statistics.median(r[0] for r in reference)
    rows, met_all = [], True
    for run in runs:
        per_model = [r[0] * run.models for r in reference]
        saving = 1 - run.peak_rss / (one * run.models)
        target = TARGETS.get(run.models)
        met = target is None or saving >= target
        met_all = met_all and met
        rows.append([
            f"peak RSS serving {run.models:,} tenant models, whole process tree (GiB)",
            f"fleet {gib(run.peak_rss)} ({run.replicas} replicas, {run.processes} processes)",
            f"{run.models:,} x `mlflow models serve` {_serving.med([p / GIB for p in per_model])}",
            f"{run.peak_rss / (one * run.models):.4f}x: {saving:.1%} less",
            f"≥ {target:.0%} less" if target else "-",
            ("yes" if met else "no") if target else "-",
        ])  # fmt: skip
    for run in runs:
        for label, (fleet_ms, bare_ms) in run.latency.items():
            p50 = statistics.median(fleet_ms)
            bare50 = statistics.median(bare_ms)
            rows.append([
                f"predict round trip from a driver process (RayFleet.predict), "
                f"{run.models:,} models served, 1 text, {label}, p50 / p99 (ms)",
                f"{p50:.2f} / {_serving.percentile(fleet_ms, 99):.2f}",
                f"bare forward pass in-process {bare50:.2f} / "
                f"{_serving.percentile(bare_ms, 99):.2f}",
                f"+{p50 - bare50:.2f} ms (p50)",
                "- (the REST API's budget: < 5 ms over the forward pass, end to end)",
                "-",
            ])  # fmt: skip
    notes = [
        f"reference: one `mlflow models serve` (pyfunc around worker.inference.Classifier, "
        f"--env-manager local, 1 worker) measured {len(reference)} times: "
        f"{_serving.med([r[0] / GIB for r in reference])} GiB RSS, "
        f"{_serving.med([r[1] / GIB for r in reference])} GiB PSS, ready after "
        f"{_serving.med([r[2] for r in reference], '{:.1f}')} s; N models = N x one server "
        "(one real server measured, multiplied)",
        f"tenant models: tiny BERT, {tar_bytes:,} bytes per tar, memory_bytes "
        f"{memory_bytes:,} as registration measures it; pool: replica budget 4 GiB, "
        "max 4 sets, 1 replica per set",
    ]
    for run in runs:
        notes.append(
            f"fleet with {run.models:,} models: peak PSS {gib(run.peak_pss)} GiB; replica RSS "
            f"{', '.join(gib(r) for r in run.replica_rss)} GiB; apply {run.apply_s:.1f} s, "
            f"all loaded {run.ready_s:.1f} s after it began; load_ms per model in the "
            f"replicas p50 {statistics.median(run.load_ms):.1f} / p99 "
            f"{_serving.percentile(run.load_ms, 99):.1f}"
        )
    notes += [
        f"1-minute load average at start / end: {load_start:.2f} / {load_end:.2f} (the "
        "machine is shared)",
        *_serving.machine_facts(" (everything on the CPU)"),
    ]
    _serving.finish(_serving.entry("serving_memory", _serving.table(rows), notes), args)
    return 0 if met_all else 1


if __name__ == "__main__":
    sys.exit(main())
