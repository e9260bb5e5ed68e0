"""Warm predict latency through the REST API, against the bare forward pass and against one
``mlflow models serve`` process serving the same model.

    .venv/bin/python benchmarks/predict_latency.py           # full: 3 reps x 300 calls each
    .venv/bin/python benchmarks/predict_latency.py --quick   # smoke: 1 rep x 30 calls

What runs, on a fresh ``WORKBENCH_VAR_DIR`` (SQLite, local artifact store):

* a private local Ray head (``worker.serving.local_ray``), the embedded default;
* in this process: Django; a tiny BERT trained on a banking77 slice with the worker's own
  loop, registered as a model version, evaluated, approved and deployed to production
  through the workbench's services (the fleet controller's passes run in-process,
  ``tests.deploy_helpers.approve``), so the fleet holds it warm and the controller has
  published its routes;
* gunicorn on loopback (``workbench/gunicorn_conf.py``, 1 sync worker): the REST API, which
  predicts by the published routes straight to the replica's socket (no Ray in it);
* ``mlflow models serve`` (``--env-manager local``, 1 worker) of a pyfunc wrapping
  ``worker.inference.Classifier`` on the same model directory: the reference server.

Then, per repetition, interleaved call by call (A B C A B C ...), one banking77 text per
call, keep-alive HTTP connections, after 30 untimed warm-up calls of each:

* A, the project: ``POST /api/v1/tenants/<t>/models/<name>/predict`` with a bearer token;
* B, the bare forward pass: ``Classifier.predict([text])`` in this process;
* C, the reference server: ``POST /invocations`` on the MLflow server;
* D, the replica's socket from this process by the published routes (what the web process
  sends, without the web tier): where A's overhead goes.

The figure is the p50 overhead of A over B (target < 5 ms) and the p50/p99 of each. Then
the first predict of a fresh web process against its steady state (target ≤ 1.5x): per rep
a new gunicorn, its first predict once ``/healthz`` answers, then the p50 of its next 50.
The full run prepends its table to ``benchmarks/README.md``. Processes and temp files are
removed at exit.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    Process,
    commit,
    cpu_model,
    free_port,
    gpu,
    mem_total_gib,
    record,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BANKING77_TEST = ROOT.parent / "shared" / "datasets" / "banking77" / "test.csv"
TARGET_OVERHEAD_MS = 5.0
TARGET_FIRST_RATIO = 1.5
FRESH_REPS = 5
FRESH_STEADY_CALLS = 50


def texts(n: int, seed: int) -> list[str]:
    with BANKING77_TEST.open(newline="", encoding="utf-8") as fh:
        rows = [row["text"] for row in csv.DictReader(fh)]
    return random.Random(seed).choices(rows, k=n)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


class Http:
    """One keep-alive connection; returns (status, parsed JSON)."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port, self.headers = port, headers
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        self.conn.request("POST", path, body=data, headers=self.headers)
        response = self.conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None


def wait_http(port: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing answers on port {port} within {timeout:.0f} s")


def setup_workbench(var: Path, ray_address: str) -> dict[str, Any]:
    """Django in this process: a tenant, a deployed model, a token; returns what the
    client needs."""
    os.environ.update(
        {
            "WORKBENCH_VAR_DIR": str(var),
            "RAY_ADDRESS": ray_address,
            "DJANGO_SETTINGS_MODULE": "workbench.settings",
            "WORKBENCH_TESTING": "0",
        }
    )
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "ARTIFACT_STORE", "PROMETHEUS_MULTIPROC_DIR"):
        os.environ.pop(name, None)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from apps.deployments.models import Deployment
    from apps.tenants import services as tenants
    from apps.tenants.models import Role
    from tests.deploy_helpers import approve, register
    from tests.worker.serving.models import pack, train_tiny

    tenant = tenants.tenant_create(actor=None, slug="bench", name="Bench")
    users = {}
    for name, role in (("sci", Role.SCIENTIST), ("rev", Role.REVIEWER)):
        user = tenants.user_create(username=name, password="x" * 20, email=f"{name}@example.com")
        tenants.membership_add(actor=None, tenant=tenant, user=user, role=role)
        users[name] = user

    class Actor:
        def __init__(self, user: Any) -> None:
            self.user = user

    model_dir = train_tiny(var / "model", seed=11)
    packed = pack(model_dir, var / "model.tar")
    version = register(Actor(users["sci"]), tenant, "intents", packed)
    deployment = approve(Actor(users["sci"]), Actor(users["rev"]), version, "production")
    deployment = Deployment.objects.get(pk=deployment.pk)
    if deployment.status != "warm":
        raise RuntimeError(f"the deployment is {deployment.status}: {deployment.failure}")
    token = tenants.token_create(user=users["sci"], name="bench").secret
    return {"token": token, "model_dir": model_dir, "tenant": "bench", "model": "intents",
            "model_version": str(version.pk)}  # fmt: skip


def save_mlflow_model(model_dir: Path, target: Path) -> Path:
    import mlflow.pyfunc

    from benchmarks import mlflow_classifier

    mlflow.pyfunc.save_model(
        path=str(target),
        python_model=mlflow_classifier.ClassifierModel(),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(ROOT / "worker"), str(ROOT / "benchmarks")],
        pip_requirements=["torch==2.13.0", "transformers", "tokenizers"],
    )
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--record", action="store_true", help="record --quick results too")
    args = parser.parse_args()
    reps, calls = (1, 30) if args.quick else (args.reps, args.calls)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from worker.serving import local_ray

    var = Path(tempfile.mkdtemp(prefix="wb-predict-"))
    processes: list[Process] = []
    head = None
    try:
        print("starting a local Ray head ...", flush=True)
        head = local_ray.ensure_head(var / "ray", num_cpus=2)
        local_ray.use_head_auth(head)  # this process and gunicorn authenticate to it
        print("training and deploying a tiny model ...", flush=True)
        setup = setup_workbench(var, head.address)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        api_port, mlflow_port = free_port(), free_port()
        web = Process(
            "gunicorn",
            [str(BIN / "gunicorn"), "-c", "workbench/gunicorn_conf.py", "--workers", "1",
             "--bind", f"127.0.0.1:{api_port}", "workbench.wsgi"],
            env, var / "gunicorn.log",
        )  # fmt: skip
        mlflow_dir = save_mlflow_model(setup["model_dir"], var / "mlflow-model")
        reference = Process(
            "mlflow",
            [str(BIN / "mlflow"), "models", "serve", "-m", str(mlflow_dir), "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(mlflow_port), "--workers", "1"],
            {**env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}, var / "mlflow.log",
        )  # fmt: skip
        processes += [web, reference]
        for process in processes:
            process.start()
        wait_http(api_port, "/healthz", 120)
        wait_http(mlflow_port, "/ping", 180)

        from worker.inference import load_classifier

        bare = load_classifier(Path(setup["model_dir"]), device="cpu")
        # The bare pass runs as the replica's does, on one torch thread (Ray starts its
        # fractional-CPU actors with OMP_NUM_THREADS=1): the same computation on both sides.
        import torch

        torch.set_num_threads(1)
        api = Http(api_port, {"Authorization": f"Bearer {setup['token']}",
                              "Content-Type": "application/json"})  # fmt: skip
        ref = Http(mlflow_port, {"Content-Type": "application/json"})
        path = f"/api/v1/tenants/{setup['tenant']}/models/{setup['model']}/predict"

        def call_api(text: str) -> str:
            status, body = api.post(path, {"inputs": [text]})
            if status != 200:
                raise RuntimeError(f"predict answered {status}: {body}")
            return str(body["outputs"][0]["label"])

        def call_bare(text: str) -> str:
            return bare.predict([text])[0]["label"]

        def call_ref(text: str) -> str:
            status, body = ref.post("/invocations", {"inputs": [text]})
            if status != 200:
                raise RuntimeError(f"mlflow answered {status}: {body}")
            return str(body["predictions"][0])

        from apps.deployments.dataplane import RoutedFleet

        # D, the replica's socket straight from this process (the call the web process
        # makes, without the web tier): splits the overhead into web tier and replica.
        direct = RoutedFleet()
        model_id = setup["model_version"]

        def call_replica(text: str) -> str:
            return str(direct.predict("classifier", model_id, [text]).outputs[0]["label"])

        sides = {"api": call_api, "bare": call_bare, "mlflow": call_ref, "replica": call_replica}
        for text in texts(30, seed=0):  # warm-up, untimed; the three must agree
            labels = {name: fn(text) for name, fn in sides.items()}
            if len(set(labels.values())) != 1:
                raise RuntimeError(f"the three disagree on {text!r}: {labels}")
        timings: dict[str, list[float]] = {name: [] for name in sides}
        per_rep: list[dict[str, float]] = []
        for rep in range(reps):
            rep_times: dict[str, list[float]] = {name: [] for name in sides}
            for text in texts(calls, seed=rep + 1):
                for name, fn in sides.items():
                    started = time.perf_counter()
                    fn(text)
                    rep_times[name].append((time.perf_counter() - started) * 1000)
            for name in sides:
                timings[name] += rep_times[name]
            per_rep.append({name: statistics.median(v) for name, v in rep_times.items()})
            print(f"rep {rep + 1}: " + ", ".join(
                f"{n} p50 {v:.2f} ms" for n, v in per_rep[-1].items()), flush=True)  # fmt: skip
        print("fresh web processes: first predict against their steady state ...", flush=True)
        fresh = fresh_web_first_predicts(
            env, var, path, setup["token"], reps=2 if args.quick else FRESH_REPS
        )
        report(timings, per_rep, fresh, calls=calls, reps=reps,
               record_it=not args.quick or args.record)  # fmt: skip
        return 0
    finally:
        for process in reversed(processes):
            process.stop()
        if head is not None:
            from worker.serving.fleet import close_all

            close_all()  # Serve's handle threads would log their failures at exit
            local_ray.stop_head(head.pid)
        shutil.rmtree(var, ignore_errors=True)


def fresh_web_first_predicts(
    env: dict[str, str], var: Path, path: str, token: str, *, reps: int
) -> list[tuple[float, float]]:
    """Per rep, a new gunicorn (same settings), once its /healthz answers: the first
    predict it serves, and the p50 of the next FRESH_STEADY_CALLS (its steady state)."""
    results = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for rep in range(reps):
        port = free_port()
        web = Process(
            f"gunicorn-fresh-{rep}",
            [str(BIN / "gunicorn"), "-c", "workbench/gunicorn_conf.py", "--workers", "1",
             "--bind", f"127.0.0.1:{port}", "workbench.wsgi"],
            env, var / f"gunicorn-fresh-{rep}.log",
        )  # fmt: skip
        web.start()
        try:
            wait_http(port, "/healthz", 120)
            api = Http(port, headers)
            calls = []
            for text in texts(FRESH_STEADY_CALLS + 1, seed=100 + rep):
                started = time.perf_counter()
                status, body = api.post(path, {"inputs": [text]})
                calls.append((time.perf_counter() - started) * 1000)
                if status != 200:
                    raise RuntimeError(f"predict answered {status}: {body}")
            results.append((calls[0], statistics.median(calls[1:])))
            print(f"fresh web {rep + 1}: first {calls[0]:.2f} ms, then p50 "
                  f"{results[-1][1]:.2f} ms", flush=True)  # fmt: skip
        finally:
            web.stop()
    return results


def report(
    timings: dict[str, list[float]],
    per_rep: list[dict[str, float]],
    fresh: list[tuple[float, float]],
    *,
    calls: int,
    reps: int,
    record_it: bool,
) -> None:
    p50 = {n: percentile(v, 0.5) for n, v in timings.items()}
    p99 = {n: percentile(v, 0.99) for n, v in timings.items()}
    overheads = [r["api"] - r["bare"] for r in per_rep]
    overhead = p50["api"] - p50["bare"]
    spread = f"{min(overheads):.2f} to {max(overheads):.2f}" if len(overheads) > 1 else "—"
    met = "yes" if overhead < TARGET_OVERHEAD_MS else "NO"
    rows = [
        "| figure | project (REST API -> fleet) | reference | ratio | target | met? |",
        "|---|---|---|---|---|---|",
        f"| p50 overhead over the bare forward pass | {overhead:.2f} ms (per rep {spread}) "
        f"| bare forward p50 {p50['bare']:.2f} ms | — | < {TARGET_OVERHEAD_MS:g} ms | {met} |",
        f"| predict p50 | {p50['api']:.2f} ms | mlflow models serve {p50['mlflow']:.2f} ms "
        f"| {p50['api'] / p50['mlflow']:.2f}x | — | — |",
        f"| predict p99 | {p99['api']:.2f} ms | mlflow models serve {p99['mlflow']:.2f} ms "
        f"| {p99['api'] / p99['mlflow']:.2f}x | — | — |",
        f"| bare forward p50 / p99 | — | {p50['bare']:.2f} / {p99['bare']:.2f} ms | — | — | — |",
    ]
    if "replica" in p50:
        rows.append(
            f"| where the overhead goes: the replica's socket from the client (no web tier) "
            f"p50 | {p50['replica']:.2f} ms: web tier {p50['api'] - p50['replica']:.2f} ms, "
            f"replica hop + its pass {p50['replica'] - p50['bare']:.2f} ms over the bare pass "
            f"| — | — | — | — |"
        )
    if fresh:
        firsts = [f for f, _ in fresh]
        steadies = [s for _, s in fresh]
        ratios = [f / s for f, s in fresh]
        ratio = statistics.median(ratios)
        fresh_met = "yes" if ratio <= TARGET_FIRST_RATIO else "NO"
        rows.append(
            f"| first predict of a fresh web process ({len(fresh)} processes) "
            f"| {statistics.median(firsts):.2f} ms ({min(firsts):.2f}-{max(firsts):.2f}) "
            f"| its steady-state p50 {statistics.median(steadies):.2f} ms "
            f"| {ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| ≤ {TARGET_FIRST_RATIO:g}x | {fresh_met} |"
        )
    table = "\n".join(rows)
    print(table)
    if not record_it:
        return
    entry = (
        f"### predict_latency — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {os.cpu_count()} cores, {mem_total_gib():.0f} GiB, {cpu_model()}; "
        f"GPU: {gpu()}; commit {commit()}; load average before: "
        f"{os.getloadavg()[0]:.2f}.\n"
        f"{reps} reps x {calls} calls per side, interleaved call by call, one banking77 text "
        "per call, after 30 warm-up calls; gunicorn 1 sync worker; mlflow models serve 1 "
        "worker; tiny BERT on CPU, the bare pass on one torch thread as in a replica. "
        "Fresh web processes: a new gunicorn (same settings) per "
        f"rep, its first predict once /healthz answers, against the p50 of its next "
        f"{FRESH_STEADY_CALLS} calls.\n\n"
        f"{table}\n"
    )
    record(entry)


if __name__ == "__main__":
    sys.exit(main())
