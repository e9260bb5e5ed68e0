"""Time from ``POST runs/`` to ``running`` on an idle worker, against a bare Celery task.

    .venv/bin/python benchmarks/run_start_latency.py           # full: Redis 20 reps, SQLite 10
    .venv/bin/python benchmarks/run_start_latency.py --quick   # CI smoke: Redis, 3 reps

Starts the real thing on a fresh ``WORKBENCH_VAR_DIR`` (SQLite DB, local artifact store,
MLflow on SQLite): gunicorn on loopback (1 sync worker) and one Celery worker process,
``celery -A workbench worker -Q default,gpu --concurrency 1`` (plus ``-n``, ``--loglevel``
and ``--include benchmarks.run_start_latency``, which adds the probe task below and
nothing else). Then, per broker, interleaved A B A B on the idle worker:

* A, the project: ``POST /api/v1/tenants/<slug>/runs/`` with a bearer token, then
  ``GET runs/<id>/`` every 20 ms until ``status == "running"``. The run goes through two
  broker hops: ``training.dispatch`` on the ``default`` queue, then ``training.execute_run``
  on the ``gpu`` queue, whose ``run_claim`` makes it running. Once running, the run is
  cancelled (``POST runs/<id>/cancel``) and the benchmark waits for ``cancelled``.
* B, the reference: ``send_task`` of a trivial task (``bench.probe``) to the ``default``
  queue of the same worker; it writes ``time.time()`` when it starts.

"Idle" before each A and B: a probe is sent and awaited first (the worker has consumed
everything before it), then 0.3 s plus a random 0-1 s pass. Brokers: Redis
(``redis://127.0.0.1:6379/9``, the production choice) and the embedded default, SQLAlchemy
on SQLite, whose consumer polls (kombu's virtual-transport ``polling_interval``, 1 s unless
set; the workbench does not set it). Clocks: every process is on this machine, so
worker-side timestamps (``started_at``, the probe's start) and the client's ``time.time()``
compare directly. The first run after the worker starts is reported apart: the pool
process imports torch before it claims the run.

The full run prepends its table, with machine facts, to ``benchmarks/README.md`` (newest
first); ``--quick`` records only with ``--record``. Processes and temp files are removed at
exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import http.client
import io
import json
import os
import platform
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from celery import shared_task

from benchmarks._common import (
    README,
    Process,
    add_record_flags,
    commit,
    cpu_model,
    free_port,
    gpu,
    launch,
    mem_total_gib,
    process_tree,
    record,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BANKING77 = Path(
    os.environ.get(
        "BANKING77_TRAIN_CSV", ROOT.parent / "shared" / "datasets" / "banking77" / "train.csv"
    )
)

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
TARGET_S = 1.0  # POST runs/ -> running, p95
POLL_S = 0.02
SETTLE_S = 0.3
SETTLE_JITTER_S = 1.0  # >= the SQLAlchemy broker's polling interval
KOMBU_POLLING_INTERVAL_S = 1.0  # kombu.transport.virtual.Channel.polling_interval default
# Settings the processes must not inherit from this shell: they get their own var dir.
ENV_DROP = (
    "DATABASE_URL",
    "ARTIFACT_STORE",
    "UPLOAD_TMP_DIR",
    "CELERY_BROKER_URL",
    "PROMETHEUS_MULTIPROC_DIR",
    "WORKBENCH_MODE",
    "TRAINING_WORK_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_ARTIFACT_ROOT",
    "MLFLOW_UI_URL",
    "DJANGO_SETTINGS_MODULE",
)
RUN_PARAMS = {"epochs": 100, "batch_size": 8}  # runs until cancelled


# --- the reference task: loaded into the worker with --include ----------------------------


@shared_task(name="bench.probe", ignore_result=True)
def probe(path: str, token: str) -> None:
    """Append ``token`` and the moment this task started to ``path``."""
    started = time.time()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{token} {started!r}\n")


# --- the processes ------------------------------------------------------------------------


def _http(
    port: int, method: str, path: str, token: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {"raw": raw[:500].decode(errors="replace")}
    return response.status, parsed


def _wait(condition: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


# --- the workbench under test -------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    tenant: str
    token: str
    version: str


def django_env(var_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "workbench.settings",
            "WORKBENCH_VAR_DIR": str(var_dir),
            "MLFLOW_TRACKING_URI": f"sqlite:///{var_dir / 'mlflow.db'}",
            "PROMETHEUS_MULTIPROC_DIR": str(var_dir / "prometheus"),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def setup_workbench(var_dir: Path, data: bytes) -> Setup:
    """Configure Django in this process (DB reads, setup), migrate, create what a run needs."""
    for key in ENV_DROP:
        os.environ.pop(key, None)
    os.environ.update(django_env(var_dir))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from apps.datasets.services import dataset_create, dataset_version_create
    from apps.tenants import services as tenants
    from apps.tenants.models import Role

    call_command("migrate", interactive=False, verbosity=0)
    user = tenants.user_create(username="bench", password=secrets.token_urlsafe(24))
    tenant = tenants.tenant_create(actor=None, slug="bench", name="Run start benchmark")
    tenants.membership_add(actor=None, tenant=tenant, user=user, role=Role.SCIENTIST)
    secret = tenants.token_create(user=user, name="run-start-benchmark").secret
    dataset = dataset_create(
        actor=user, tenant=tenant, name="intents", kind="training", task="text-classification"
    )
    upload = Path(tempfile.mkdtemp(dir=settings.UPLOAD_TMP_DIR)) / "intents.csv"
    upload.write_bytes(data)
    version = dataset_version_create(
        actor=user,
        dataset=dataset,
        path=upload,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        filename="intents.csv",
        text_column="text",
        label_column="label",
    ).version
    return Setup(tenant=tenant.slug, token=secret, version=str(version.pk))


def banking_slice(labels: int = 6, per_label: int = 24, offset: int = 0) -> bytes:
    by_label: dict[str, list[str]] = defaultdict(list)
    with BANKING77.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            by_label[row["category"]].append(row["text"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text", "label"])
    for label in sorted(by_label)[:labels]:
        for text in by_label[label][offset : offset + per_label]:
            writer.writerow([text, label])
    return out.getvalue().encode()


class Stack:
    """gunicorn + one Celery worker on one broker, and a producer for the probe task."""

    def __init__(self, work: Path, var_dir: Path, tag: str, label: str, broker_url: str) -> None:
        broker = tag  # in file names
        self.broker, self.broker_url = label, broker_url
        self.env = django_env(var_dir)
        self.env["CELERY_BROKER_URL"] = broker_url
        self.env["TRAINING_WORK_DIR"] = str(work / f"training-{broker}")
        self.port = free_port()
        self.probe_file = work / f"probe-{broker}.log"
        self.probe_file.touch()
        self.web = Process(
            "gunicorn",
            [str(BIN / "gunicorn"), "workbench.wsgi:application", "-b", f"127.0.0.1:{self.port}",
             "--workers", "1", "--timeout", "120"],
            self.env,
            work / f"gunicorn-{broker}.log",
        )  # fmt: skip
        worker_env = {**self.env, "LOG_LEVEL": "INFO"}
        self.worker = Process(
            "celery worker",
            [str(BIN / "celery"), "-A", "workbench", "worker", "-Q", "default,gpu",
             "--concurrency", "1", "--loglevel", "INFO", "-n", f"bench-{os.getpid()}@%h",
             "--include", "benchmarks.run_start_latency"],
            worker_env,
            work / f"worker-{broker}.log",
        )  # fmt: skip
        from celery import Celery

        self.app = Celery("run-start-benchmark", broker=broker_url)
        self.app.conf.task_default_queue = "default"

    def start(self) -> None:
        self.worker.start()
        self.web.start()
        _wait(
            lambda: (
                self._check(self.worker)
                and "ready." in self.worker.log_path.read_text(errors="replace")
            ),
            90,
            "celery worker ready",
            every=0.2,
        )
        _wait(lambda: self._check(self.web) and self._healthy(), 60, "gunicorn /healthz", 0.2)

    def _check(self, process: Process) -> bool:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        return True

    def _healthy(self) -> bool:
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        return False

    def worker_pids(self) -> set[int]:
        assert self.worker.proc is not None
        return set(process_tree(self.worker.proc.pid))

    def probe(self) -> float:
        """Send the probe task; seconds from send to the task's start (worker clock)."""
        token = secrets.token_hex(8)
        sent = time.time()
        self.app.send_task("bench.probe", args=[str(self.probe_file), token], queue="default")

        def started() -> float | None:
            self._check(self.worker)
            for line in self.probe_file.read_text().splitlines():
                if line.startswith(token + " "):
                    return float(line.split()[1])
            return None

        at = _wait(started, 60, "probe task started", every=0.002)
        return float(at) - sent

    def idle(self) -> None:
        """The worker has consumed everything sent before, and then sat idle a while.

        A random while: a polling consumer (the SQLAlchemy broker) would otherwise always
        be caught at the same point of its polling cycle.
        """
        self.probe()
        time.sleep(SETTLE_S + random.uniform(0.0, SETTLE_JITTER_S))

    def stop(self) -> None:
        self.web.stop()
        self.worker.stop()
        with contextlib.suppress(Exception):
            self.app.close()


# --- the measured operations --------------------------------------------------------------


@dataclass(frozen=True)
class RunStart:
    seen_s: float  # POST sent -> a GET shows running
    started_s: float  # POST sent -> started_at (the claim, worker clock)
    post_s: float  # POST round trip
    created_s: float  # POST sent -> created_at
    dispatched_s: float  # POST sent -> dispatched_at (after the first hop)
    polls: int
    cancel_s: float  # cancel POST sent -> status cancelled


def _epoch(value: Any) -> float:
    return float(value.timestamp())


def run_start(stack: Stack, setup: Setup) -> RunStart:
    from apps.training.models import TrainingRun

    runs = f"/api/v1/tenants/{setup.tenant}/runs/"
    body = {"dataset_version": setup.version, "base_model": "tiny-bert", "params": RUN_PARAMS}
    sent = time.time()
    status, created = _http(stack.port, "POST", runs, setup.token, body)
    answered = time.time()
    if status != 202:
        raise RuntimeError(f"POST runs/ answered {status}: {created}")
    run_id = created["id"]
    polls = 0
    while True:
        status, run = _http(stack.port, "GET", f"{runs}{run_id}/", setup.token)
        polls += 1
        if status == 200 and run["status"] == "running":
            seen = time.time()
            break
        if status != 200 or run["status"] not in ("queued", "running"):
            raise RuntimeError(f"run {run_id}: {status} {run}\n{stack.worker.log_tail()}")
        if time.time() - sent > 60:
            raise TimeoutError(f"run {run_id} not running after 60 s\n{stack.worker.log_tail()}")
        time.sleep(POLL_S)

    row = TrainingRun.objects.get(pk=run_id)
    claimed_pid = int(row.claimed_by.rsplit(":", 1)[1])
    if claimed_pid not in stack.worker_pids():
        raise RuntimeError(f"run {run_id} was claimed by {row.claimed_by}, not this worker")

    cancel_sent = time.time()
    status, _ = _http(stack.port, "POST", f"{runs}{run_id}/cancel", setup.token)
    if status != 200:
        raise RuntimeError(f"cancel answered {status}")
    _wait(
        lambda: TrainingRun.objects.filter(pk=run_id, status="cancelled").exists(),
        60,
        f"run {run_id} cancelled",
        every=0.05,
    )
    cancelled = time.time()
    return RunStart(
        seen_s=seen - sent,
        started_s=_epoch(row.started_at) - sent,
        post_s=answered - sent,
        created_s=_epoch(row.created_at) - sent,
        dispatched_s=_epoch(row.dispatched_at) - sent,
        polls=polls,
        cancel_s=cancelled - cancel_sent,
    )


# --- reporting ----------------------------------------------------------------------------


@dataclass
class BrokerResults:
    broker: str
    url: str
    runs: list[RunStart] = field(default_factory=list)
    probes: list[float] = field(default_factory=list)
    first_run: RunStart | None = None  # right after the worker started: imports torch
    load: tuple[float, float] = (0.0, 0.0)


def _pct(values: Sequence[float], q: int) -> float:
    """Nearest-rank percentile: with few samples, an observed value, never interpolated."""
    ordered = sorted(values)
    rank = -(-len(ordered) * q // 100)  # ceil(n * q / 100)
    return ordered[max(0, min(len(ordered), rank) - 1)]


def _ms3(values: Sequence[float]) -> str:
    return " / ".join(f"{_pct(values, q) * 1000:.0f}" for q in (50, 95, 100))


def table(results: Sequence[BrokerResults]) -> tuple[str, bool]:
    rows = [
        "| figure | project | reference | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    ok = True
    for res in results:
        seen = [r.seen_s for r in res.runs]
        started = [r.started_s for r in res.runs]
        met = _pct(seen, 95) < TARGET_S
        ok = ok and met
        ratio = _pct(started, 50) / _pct(res.probes, 50)
        rows += [
            f"| POST runs/ → `running` seen by the client (GET every 20 ms), {res.broker}, "
            f"p50 / p95 / max (ms) | {_ms3(seen)} | - | - | p95 < {TARGET_S:.0f} s "
            f"| {'yes' if met else 'no'} |",
            f"| POST runs/ → worker claims the run (`started_at`), {res.broker}, "
            f"p50 / p95 / max (ms) | {_ms3(started)} | bare Celery task, send → start: "
            f"{_ms3(res.probes)} | {ratio:.1f}x (p50) | - (2 broker hops + DB vs 1 hop) | - |",
        ]
    return "\n".join(rows), ok


def breakdown(results: Sequence[BrokerResults]) -> str:
    rows = [
        "| step (medians, ms) | " + " | ".join(r.broker for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def line(label: str, values: list[float]) -> None:
        rows.append(f"| {label} | " + " | ".join(f"{v * 1000:.0f}" for v in values) + " |")

    med = statistics.median
    line(
        "POST sent → run row created (`created_at`)",
        [med(r.created_s for r in x.runs) for x in results],
    )
    line(
        "→ dispatched (`dispatched_at`): commit, `training.dispatch` hop, runs_dispatch",
        [med(r.dispatched_s - r.created_s for r in x.runs) for x in results],
    )
    line(
        "→ claimed (`started_at`): `training.execute_run` hop, run_claim",
        [med(r.started_s - r.dispatched_s for r in x.runs) for x in results],
    )
    line(
        "→ seen running by the client (poll interval + GET)",
        [med(r.seen_s - r.started_s for r in x.runs) for x in results],
    )
    line("POST runs/ round trip (202)", [med(r.post_s for r in x.runs) for x in results])
    line("cancel sent → `cancelled`", [med(r.cancel_s for r in x.runs) for x in results])
    return "\n".join(rows)


def machine_facts() -> list[str]:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return [
        f"CPU: {cpu_model()}, {usable} usable of {cores} cores",
        f"memory: {mem_total_gib():.1f} GiB",
        f"GPU: {gpu()} (the runs train on the CPU; they are cancelled once running)",
        f"OS: {platform.platform()}; Python {platform.python_version()}",
    ]


def _redis_version() -> str:
    with contextlib.suppress(Exception):
        import redis

        return str(redis.Redis.from_url(REDIS_URL).info("server")["redis_version"])
    return "?"


def report(results: Sequence[BrokerResults], *, commit: str, when: str) -> tuple[str, bool]:
    body, ok = table(results)
    notes = []
    for res in results:
        first = res.first_run
        notes.append(
            f"{res.broker} (`{res.url}`): {len(res.runs)} runs and {len(res.probes)} probes, "
            "interleaved A B on the idle worker; percentiles nearest-rank"
            + (
                f"; the first run after the worker started (imports torch, not counted): "
                f"seen running after {first.seen_s * 1000:.0f} ms"
                if first
                else ""
            )
            + f"; 1-minute load average at start / end: {res.load[0]:.2f} / {res.load[1]:.2f}"
        )
    notes += [
        "project: POST with a bearer token to gunicorn (1 sync worker, loopback), run row in "
        "SQLite; `training.dispatch` (queue default) then `training.execute_run` (queue gpu) "
        "on one worker, `celery -A workbench worker -Q default,gpu --concurrency 1`; each run "
        "is cancelled once running and awaited as `cancelled` before the next measurement",
        "reference: `send_task('bench.probe')` to queue default of the same worker; the task "
        "writes time.time() as it starts (defined in this benchmark, loaded with `--include`)",
        f"idle: before each measurement a probe is sent and awaited, then {SETTLE_S:.1f} s + "
        f"uniform(0, {SETTLE_JITTER_S:.0f}) s pass (a random phase against a polling consumer)",
        "SQLAlchemy broker: kombu's virtual transport polls each queue, sleeping "
        f"`polling_interval` ({KOMBU_POLLING_INTERVAL_S:.0f} s by default; the workbench sets "
        "no `broker_transport_options`) when they are empty: up to that long per hop. Redis "
        f"{_redis_version()}: BRPOP, no polling",
        *machine_facts(),
    ]
    text = (
        f"### run_start_latency — {when} — commit {commit}\n\n"
        f"{body}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        f"\nWhere the project's time goes:\n\n{breakdown(results)}\n"
    )
    return text, ok


def measure(stack: Stack, setup: Setup, reps: int) -> BrokerResults:
    res = BrokerResults(broker=stack.broker, url=stack.broker_url)
    stack.idle()
    res.first_run = run_start(stack, setup)  # warm-up: the pool process imports torch
    load_start = os.getloadavg()[0]
    for rep in range(1, reps + 1):
        stack.idle()
        run = run_start(stack, setup)
        stack.idle()
        ref = stack.probe()
        res.runs.append(run)
        res.probes.append(ref)
        print(
            f"  {stack.broker} rep {rep}: run seen running {run.seen_s * 1000:.0f} ms "
            f"(claimed {run.started_s * 1000:.0f} ms, {run.polls} GETs) | bare task "
            f"{ref * 1000:.1f} ms",
            flush=True,
        )
    res.load = (load_start, os.getloadavg()[0])
    return res


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="run-start-latency-"))
    stack: Stack | None = None
    results: list[BrokerResults] = []
    try:
        var_dir = work / "var"
        print("setting up a throwaway workbench (migrate, tenant, token, dataset) ...", flush=True)
        setup = setup_workbench(var_dir, banking_slice())
        # The embedded broker's URL is the one the settings default to, spelt out.
        sqla = f"sqla+sqlite:///{var_dir / 'celery-broker.sqlite3'}"
        chosen = [("redis", "Redis broker", REDIS_URL, args.redis_reps)]
        if args.sqla_reps:
            chosen.append(("sqla", "embedded SQLAlchemy/SQLite broker", sqla, args.sqla_reps))
        for tag, label, url, reps in chosen:
            print(f"{label}: starting gunicorn and a celery worker ...", flush=True)
            stack = Stack(work, var_dir, tag, label, url)
            stack.start()
            results.append(measure(stack, setup, reps))
            stack.stop()
            stack = None
        entry, _ = report(
            results,
            commit=commit(),
            when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )
        print("\n" + entry)
        if args.record:
            record(entry)
            print(f"recorded in {README.relative_to(ROOT)}")
        for res in results:
            met = _pct([r.seen_s for r in res.runs], 95) < TARGET_S
            print(f"{res.broker}: target {'met' if met else 'NOT met'}")
        return 0
    except Exception:
        if stack is not None:
            print(f"--- worker log tail ---\n{stack.worker.log_tail()}", file=sys.stderr)
            print(f"--- gunicorn log tail ---\n{stack.web.log_tail()}", file=sys.stderr)
        raise
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Redis only, 3 reps (CI smoke)")
    parser.add_argument("--redis-reps", type=int, help="runs on Redis (default 20; 3 --quick)")
    parser.add_argument(
        "--sqla-reps",
        type=int,
        help="runs on the embedded SQLAlchemy broker (default 10; 0 with --quick)",
    )
    add_record_flags(parser)
    args = parser.parse_args(argv)
    args.redis_reps = args.redis_reps or (3 if args.quick else 20)
    if args.sqla_reps is None:
        args.sqla_reps = 0 if args.quick else 10
    return launch(parser, args, run, data=BANKING77)


if __name__ == "__main__":
    sys.exit(main())
