"""Fault injection on the real fleet: a real Ray, the real fleet controller
(``manage.py fleet_controller``) and a real web process (gunicorn), both on the test
database, while this process injects the fault.

Each case keeps pollers on the web process throughout (``/healthz``, the fleet page, the
deployments page; the predict API where the case is about predicts) and asserts that the
pages answered every time, that predicts were answered or got a quick ``503`` with
``Retry-After`` (never a 500, never a hang), that nothing was lost, and that the state
converged; each prints how long convergence took (figures, not asserts: see
benchmarks/fleet_recovery.py for the measured ones).

The cases that share the session's Ray head (``ray_address``) leave its Serve application
empty behind them; the Ray-head case runs the controller in embedded mode, so the
controller starts (and restarts) a head of its own.

The Celery-mid-evaluation, Redis-restart and zombie-training cases are in
tests/test_training_leases.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db.models import F
from django.test import Client

from apps.deployments.models import Deployment, FleetLease, ServingPool, Warmup
from apps.evaluation.models import Evaluation
from apps.promotions import services as promotions
from apps.promotions.models import PromotionRequest
from apps.registry.models import ModelVersion
from benchmarks._common import Process, process_tree
from tests.conftest import Actor, make_actor
from tests.deploy_helpers import GOLDEN_TEXTS, register
from tests.training_helpers import wait_for
from tests.worker.serving.models import PackedModel, pack, train_tiny, variant
from worker.serving import local_ray

pytestmark = [pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A request that takes this long is a hang (the API's own bound is ~1 s per replica).
HANG_S = 15.0
# The controller of these tests: a pass every second, a lease that runs out in five.
CONTROLLER_ENV = {"FLEET_RECONCILE_SECONDS": "1", "FLEET_LEASE_SECONDS": "5"}
SCORE_TOLERANCE = 1e-3


# --- processes ---------------------------------------------------------------------------


def _subprocess_env(database_url: str, extra: dict[str, str]) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ARTIFACT_STORE": settings.ARTIFACT_STORE,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(ROOT),
        **extra,
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


class Proc(Process):
    """A subprocess in its own session, logging to a file, that a case may also SIGKILL."""

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc

    def log(self, lines: int = 60) -> str:
        return "\n".join(line[:400] for line in self.log_tail(lines).splitlines())

    def kill(self) -> None:
        """SIGKILL the process and its group: no clean-up of its own."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


class Web(Proc):
    """gunicorn: where it answers, and its workers (the processes that serve requests)."""

    host = "127.0.0.1"
    port = 0
    workers: list[int] = []

    def worker_pids(self) -> list[int]:
        return sorted(process_tree(self.process.pid)[1:])


def _spawn(
    name: str, command: list[str], env: dict[str, str], log_path: Path, kind: type[Proc] = Proc
) -> Any:
    process = kind(name, command, env, log_path)
    process.start()
    return process


def start_web(
    tmp: Path,
    database_url: str,
    *,
    name: str = "web",
    netns: str | None = None,
    bind_host: str = "127.0.0.1",
    reach_host: str | None = None,
) -> Web:
    """gunicorn (1 gthread worker, 4 threads: pages keep answering while a predict waits)
    on the test database; waits for /healthz."""
    port = _free_port()
    command = [str(BIN / "gunicorn"), "-c", "workbench/gunicorn_conf.py", "--workers", "1",
               "--worker-class", "gthread", "--threads", "4", "--bind", f"{bind_host}:{port}",
               "workbench.wsgi"]  # fmt: skip
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    env = _subprocess_env(database_url, {"GUNICORN_TIMEOUT": "120"})
    env.pop("RAY_ADDRESS", None)  # the web process needs no Ray: nothing tells it of one
    web: Web = _spawn(name, command, env, tmp / f"{name}.log", kind=Web)
    web.host, web.port = reach_host or bind_host, port
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(OSError):
            if http_get(web, "/healthz", timeout=2)[0] == 200:
                break
        if not web.alive() or time.monotonic() > deadline:
            web.stop()
            raise RuntimeError(f"gunicorn did not start:\n{web.log()}")
        time.sleep(0.3)
    web.workers = wait_for(web.worker_pids, timeout=30)
    return web


def start_controller(
    tmp: Path,
    database_url: str,
    *,
    name: str = "controller",
    ray_address: str | None,
    local_dir: Path | None = None,
) -> Proc:
    """``manage.py fleet_controller`` on the test database: on the session's Ray, or
    (``ray_address`` None) embedded, starting a head of its own under ``local_dir``."""
    extra = {**CONTROLLER_ENV, "WORKBENCH_VAR_DIR": str(tmp / f"{name}-var")}
    env = _subprocess_env(database_url, extra)
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    else:
        env.pop("RAY_ADDRESS", None)
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
            env.pop(key, None)  # the session head's token: the embedded head has its own
        assert local_dir is not None
        env["SERVING_LOCAL_DIR"] = str(local_dir)
    command = [sys.executable, "manage.py", "fleet_controller"]
    return _spawn(name, command, env, tmp / f"{name}.log")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))  # noqa: S104 - free on every interface (the netns case)
        return int(sock.getsockname()[1])


# --- HTTP ----------------------------------------------------------------------------------


def http_call(
    web: Web,
    method: str,
    path: str,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = HANG_S,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(web.host, web.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        sent = {**(headers or {})}
        if data is not None:
            sent["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def http_get(web: Web, path: str, *, timeout: float = HANG_S, **kw: Any) -> tuple[int, bytes]:
    status, _, raw = http_call(web, "GET", path, timeout=timeout, **kw)
    return status, raw


@dataclass
class Sample:
    at: float  # monotonic
    status: int | None  # None: no answer (refused, reset, timed out)
    ms: float
    error: str = ""
    retry_after: str | None = None
    code: str = ""
    labels: list[str] | None = None
    body: Any = None


class Poller:
    """One thread per named request, each asking again every ``every`` seconds and
    recording every answer, until :meth:`stop`."""

    def __init__(self, web: Web, requests: dict[str, Callable[[], Any]], every: float = 0.25):
        self.web = web
        self.samples: dict[str, list[Sample]] = {name: [] for name in requests}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(name, call, every), daemon=True)
            for name, call in requests.items()
        ]

    def __enter__(self) -> Poller:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=HANG_S + 5)

    def _loop(self, name: str, call: Callable[[], Any], every: float) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, headers, raw = call()
                sample = Sample(at=started, status=status,
                                ms=(time.monotonic() - started) * 1000,
                                retry_after=headers.get("retry-after"))  # fmt: skip
                with contextlib.suppress(ValueError):
                    parsed = json.loads(raw) if raw else None
                    if isinstance(parsed, dict) and "error" in parsed:
                        sample.code = str(parsed["error"].get("code"))
                    elif isinstance(parsed, dict) and "outputs" in parsed:
                        sample.labels = [o["label"] for o in parsed["outputs"]]
                    sample.body = parsed
            except Exception as error:  # refused, reset or timed out: recorded, asserted on
                sample = Sample(at=started, status=None, ms=(time.monotonic() - started) * 1000,
                                error=f"{type(error).__name__}: {error}")  # fmt: skip
            self.samples[name].append(sample)
            self._stop.wait(every)

    def since(self, name: str, at: float) -> list[Sample]:
        return [s for s in self.samples[name] if s.at >= at]


def assert_pages_answered(poller: Poller, names: list[str]) -> None:
    """Every page poll was a 200 (the web process never stopped answering)."""
    for name in names:
        samples = poller.samples[name]
        assert samples, f"{name} was never polled"
        bad = [s for s in samples if s.status != 200]
        assert bad == [], f"{name}: {len(bad)} of {len(samples)} polls failed, first {bad[:3]}"


def assert_predicts_clean(samples: list[Sample], *, expected: list[str] | None = None) -> None:
    """Every predict was answered (with the model's labels) or got a 503
    ``model_unavailable`` with Retry-After: never a 500, never a hang, never a refusal."""
    assert samples, "no predict was made"
    for sample in samples:
        assert sample.status in (200, 503), sample
        if sample.status == 503:
            assert sample.code == "model_unavailable" and sample.retry_after, sample
        elif expected is not None:
            assert sample.labels == expected, sample


def statuses(samples: list[Sample]) -> dict[int | None, int]:
    counted: dict[int | None, int] = {}
    for sample in samples:
        counted[sample.status] = counted.get(sample.status, 0) + 1
    return counted


# --- the workbench side ------------------------------------------------------------------


def session_cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def request_approval(requester: Actor, reviewer: Actor, version: ModelVersion) -> Deployment:
    """An approved promotion to production; the controller process loads it."""
    promotion = PromotionRequest.objects.create(
        tenant=version.registered_model.tenant, model_version=version, target="production",
        artifact_sha256=version.sha256, status="awaiting_approval", requested_by=requester.user,
    )  # fmt: skip
    promotions.promotion_approve(actor=reviewer.user, promotion=promotion, comment="ok")
    return Deployment.objects.get(promotion=promotion)


def in_status(deployment_id: str, status: str) -> Deployment | None:
    """The deployment if it is in ``status`` now; a failed one fails the test."""
    deployment = Deployment.objects.get(pk=deployment_id)
    if deployment.status == "failed" and status != "failed":
        raise AssertionError(f"{deployment_id} failed: {deployment.failure}")
    return deployment if deployment.status == status else None


def wait_status(deployment_id: str, status: str, *, timeout: float) -> Deployment:
    return wait_for(lambda: in_status(deployment_id, status), timeout=timeout)


def evaluation_labels(version: ModelVersion) -> tuple[list[str], list[float]]:
    samples = Evaluation.objects.get(model_version=version).samples
    return [s["predicted"] for s in samples], [s["score"] for s in samples]


def assert_predicts_like_evaluation(web: Web, token: str, name: str, version: ModelVersion):
    status, _, raw = http_call(
        web, "POST", f"/api/v1/tenants/acme/models/{name}/predict",
        body={"inputs": GOLDEN_TEXTS}, headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert status == 200, raw
    body = json.loads(raw)
    labels, scores = evaluation_labels(version)
    assert body["model_version"] == version.pk
    assert [o["label"] for o in body["outputs"]] == labels
    for output, score in zip(body["outputs"], scores, strict=True):
        assert abs(output["score"] - score) < SCORE_TOLERANCE


def published_endpoints(version: ModelVersion) -> tuple[str, list[dict[str, Any]]]:
    routes = ServingPool.objects.get(kind="classifier").routes
    deployment = routes["models"][version.pk]["deployment"]
    return deployment, list(routes["endpoints"].get(deployment, []))


def no_ray_in(pid: int) -> bool:
    """The process has not loaded Ray's native core (what every Ray driver maps)."""
    return "_raylet" not in Path(f"/proc/{pid}/maps").read_text()


def listening_pid(port: int) -> int:
    """The process listening on loopback TCP ``port`` (a replica's socket)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{entry}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return int(entry)
    raise LookupError(f"nothing listens on port {port}")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tmp_path_factory: Any) -> dict[str, PackedModel]:
    root = tmp_path_factory.mktemp("fault-models")
    base = train_tiny(root / "base", seed=7)
    return {
        "base": pack(base, root / "base.tar"),
        "other": pack(variant(base, root / "other", seed=3, noise=0.2), root / "other.tar"),
    }


@dataclass
class Stack:
    """What a case runs on: the test database's URL, its processes, its people."""

    tmp: Path
    database_url: str
    tenant: Any
    scientist: Actor
    reviewer: Actor
    staff: Any
    processes: list[Proc] = field(default_factory=list)

    def web(self, **kw: Any) -> Web:
        web = start_web(self.tmp, self.database_url, **kw)
        self.processes.append(web)
        return web

    def controller(self, **kw: Any) -> Proc:
        controller = start_controller(self.tmp, self.database_url, **kw)
        self.processes.append(controller)
        return controller

    def page_polls(self, web: Web) -> dict[str, Callable[[], Any]]:
        cookie = {"Cookie": session_cookie(self.staff)}
        member = {"Cookie": session_cookie(self.scientist.user)}
        token = {"Authorization": f"Bearer {self.scientist.token}"}
        return {
            "healthz": lambda: http_call(web, "GET", "/healthz"),
            "fleet page": lambda: http_call(web, "GET", "/fleet/", headers=cookie),
            "deployments page": lambda: http_call(
                web, "GET", "/t/acme/deployments/", headers=member
            ),
            "deployments api": lambda: http_call(
                web, "GET", "/api/v1/tenants/acme/deployments/", headers=token
            ),
        }

    def predict_poll(self, web: Web, name: str) -> Callable[[], Any]:
        headers = {"Authorization": f"Bearer {self.scientist.token}"}
        path = f"/api/v1/tenants/acme/models/{name}/predict"
        return lambda: http_call(web, "POST", path, body={"inputs": GOLDEN_TEXTS[:2]},
                                 headers=headers)  # fmt: skip

    def logs(self) -> str:
        return "\n\n".join(f"--- {p.name} ---\n{p.log()}" for p in self.processes)


@pytest.fixture
def stack(
    request: Any,
    tenant: Any, scientist: Actor, reviewer: Actor, worker_database_url: str,
    artifacts_dir: Path, tmp_path: Path,
) -> Iterator[Stack]:  # fmt: skip
    staff = make_actor("stella", None, None, is_staff=True).user
    stack = Stack(tmp=tmp_path, database_url=worker_database_url, tenant=tenant,
                  scientist=scientist, reviewer=reviewer, staff=staff)  # fmt: skip
    failed_before = request.session.testsfailed
    try:
        yield stack
    finally:
        if request.session.testsfailed > failed_before:  # the case failed: show why
            print(stack.logs())
        for process in reversed(stack.processes):
            process.stop()


@pytest.fixture
def shared_ray(stack: Stack, ray_address: str) -> Iterator[str]:
    """The session's Ray head, left with an empty Serve application after the case (what
    the next test that uses it expects): every deployment retired, then a controller (the
    case's own if one still runs) applies the now empty pool."""
    yield ray_address
    retired_at = _now()
    Deployment.objects.update(status="retired", standby=False)
    FleetLease.objects.filter(pk="fleet").update(generation=F("generation") + 1)
    live = [p for p in stack.processes if p.name.startswith("controller") and p.alive()]
    if not live:
        live = [stack.controller(name="controller-cleanup", ray_address=ray_address)]

    def emptied() -> bool:
        pool = ServingPool.objects.filter(kind="classifier").first()
        return pool is None or (
            pool.observed_at is not None
            and pool.observed_at > retired_at
            and not (pool.routes or {}).get("models")
        )

    wait_for(emptied, timeout=120)
    for process in live:
        process.stop()


def deploy(
    stack: Stack, packed: PackedModel, name: str, *, timeout: float = 180
) -> tuple[ModelVersion, Deployment]:
    """Register and approve a model; wait until the controller process has it warm."""
    version = register(stack.scientist, stack.tenant, name, packed)
    deployment = request_approval(stack.scientist, stack.reviewer, version)
    return version, wait_status(deployment.pk, "warm", timeout=timeout)


def wait_published(version: ModelVersion, *, timeout: float = 60) -> list[dict[str, Any]]:
    """The controller published at least one replica socket for the model."""

    def published() -> list[dict[str, Any]] | None:
        with contextlib.suppress(KeyError, ServingPool.DoesNotExist):
            return published_endpoints(version)[1] or None
        return None

    return wait_for(published, timeout=timeout)


class Supervisor:
    """Restarts a process a second after it exits, as the stack's process manager does
    (``make run``'s supervisord, compose's restart policy): the fleet controller exits to
    be restarted when it is stuck on a cluster that is gone."""

    def __init__(self, process: Proc) -> None:
        self.process = process
        self.restarts: list[int] = []  # exit codes of the runs that ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            if not self.process.alive():
                self.restarts.append(self.process.process.returncode)
                if not self._stop.wait(1.0):
                    self.process.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def converge(condition: Callable[[], Any], *, timeout: float, watch: list[Proc]) -> Any:
    """wait_for, failing at once (with its log) when a process that must live died."""

    def check() -> Any:
        for process in watch:
            if not process.alive():
                raise AssertionError(
                    f"{process.name} died (exit {process.process.returncode}):\n{process.log(30)}"
                )
        return condition()

    return wait_for(check, timeout=timeout)


def report(case: str, figures: dict[str, float]) -> None:
    shown = ", ".join(f"{name} {value:.1f} s" for name, value in figures.items())
    print(f"\n[{case}] converged: {shown}", flush=True)


# --- the cases -----------------------------------------------------------------------------


def test_a_new_ray_head_gets_every_warm_deployment_back_warm_and_verified(
    stack: Stack, packed: dict[str, PackedModel]
) -> None:
    """The embedded head stopped (by its recorded pid) while two models are warm: the
    controller (under a process manager, as deployed) starts a new head, applies the pool
    again and re-verifies each model; during the outage predicts get 503 + Retry-After and
    the deployments show ``degraded``; the web process stays up, without Ray, throughout."""
    local_dir = stack.tmp / "ray-local"
    controller = stack.controller(ray_address=None, local_dir=local_dir)
    supervisor = Supervisor(controller)
    web = stack.web()
    watch: list[Proc] = [web]
    heads: list[int] = []
    try:
        first, first_dep = deploy(stack, packed["base"], "intents", timeout=240)
        second, second_dep = deploy(stack, packed["other"], "intents-b", timeout=240)
        old = local_ray.LocalRay(**json.loads((local_dir / local_ray.STATE_FILE).read_text()))
        heads.append(old.pid)
        wait_published(first)
        wait_published(second)
        polls = {
            **stack.page_polls(web),
            "predict intents": stack.predict_poll(web, "intents"),
            "predict intents-b": stack.predict_poll(web, "intents-b"),
        }
        with Poller(web, polls) as poller:
            time.sleep(1.0)
            stopped_at, stopped_wall = time.monotonic(), _now()
            local_ray.stop_head(old.pid)

            def degraded_shown() -> float | None:
                for sample in poller.since("deployments api", stopped_at):
                    body = sample.body
                    rows = body.get("results") if isinstance(body, dict) else body
                    if isinstance(rows, list) and any(
                        r.get("status") == "degraded" for r in rows if isinstance(r, dict)
                    ):
                        return sample.at - stopped_at
                return None

            degraded_after = converge(degraded_shown, timeout=120, watch=watch)

            def new_head() -> local_ray.LocalRay | None:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    head = local_ray.LocalRay(
                        **json.loads((local_dir / local_ray.STATE_FILE).read_text())
                    )
                    if head.pid != old.pid and local_ray.is_alive(head):
                        return head
                return None

            head = converge(new_head, timeout=180, watch=watch)
            heads.append(head.pid)
            head_after = time.monotonic() - stopped_at

            def all_recovered() -> bool:
                for deployment in (first_dep, second_dep):
                    if Deployment.objects.get(pk=deployment.pk).status != "warm":
                        return False
                    recovered = Warmup.objects.filter(
                        deployment=deployment, trigger="recovery", ok=True,
                        started_at__gt=stopped_wall,
                    )  # fmt: skip
                    if not recovered.exists():
                        return False
                return True

            converge(all_recovered, timeout=240, watch=watch)
            warm_after = time.monotonic() - stopped_at

            def answering() -> bool:
                return all(
                    (s := poller.since(f"predict {n}", stopped_at)) and s[-1].status == 200
                    for n in ("intents", "intents-b")
                )

            converge(answering, timeout=60, watch=watch)
            time.sleep(1.0)
        print(f"\ncontroller exits (restarted by the supervisor): {supervisor.restarts}")
        report("ray head replaced", {"degraded shown": degraded_after,
                                     "new head up": head_after,
                                     "every deployment warm again": warm_after})  # fmt: skip
        assert_pages_answered(poller, list(stack.page_polls(web)))
        outage = []
        for version, name in ((first, "intents"), (second, "intents-b")):
            samples = poller.samples[f"predict {name}"]
            labels = evaluation_labels(version)[0][:2]
            assert_predicts_clean(samples, expected=labels)
            outage += [s for s in samples if s.status == 503]
            print(f"predict {name}: {statuses(samples)}")
            assert_predicts_like_evaluation(web, stack.scientist.token, name, version)
        assert outage, "no predict saw the outage"
        assert web.alive() and web.worker_pids() == web.workers  # the same web process
        assert all(no_ray_in(pid) for pid in [web.process.pid, *web.workers])
        for deployment in (first_dep, second_dep):
            deployment.refresh_from_db()
            assert deployment.status == "warm" and deployment.failure == ""
        assert Deployment.objects.filter(status="warm").count() == 2  # nothing lost
    finally:
        supervisor.stop()
        for process in stack.processes:
            process.stop()
        with contextlib.suppress(OSError, ValueError, TypeError):  # one started meanwhile
            heads.append(json.loads((local_dir / local_ray.STATE_FILE).read_text())["pid"])
        for pid in set(heads):
            local_ray.stop_head(pid)
        import shutil

        shutil.rmtree(local_ray.short_temp_dir(str(local_dir.resolve())), ignore_errors=True)


def _now() -> Any:
    from django.utils import timezone

    return timezone.now()


def test_a_killed_replica_is_replaced_and_rewarmed_and_predicts_never_fail(
    stack: Stack, packed: dict[str, PackedModel], shared_ray: str
) -> None:
    """SIGKILL of the replica serving a model: Serve replaces it, the controller re-warms
    the model on the new one (a verified warm-up); every predict meanwhile is answered or
    gets a 503, never a 500."""
    controller = stack.controller(ray_address=shared_ray)
    web = stack.web()
    version, deployment = deploy(stack, packed["base"], "intents")
    (victim, *_) = wait_published(version)
    labels = evaluation_labels(version)[0][:2]
    polls = {**stack.page_polls(web), "predict": stack.predict_poll(web, "intents")}
    with Poller(web, polls) as poller:
        time.sleep(1.0)
        pid = listening_pid(int(victim["port"]))
        killed_at, killed_wall = time.monotonic(), _now()
        os.kill(pid, signal.SIGKILL)

        def rewarmed() -> bool:
            current = Deployment.objects.get(pk=deployment.pk)
            replicas = {e["replica_id"] for e in published_endpoints(version)[1]}
            warmed = Warmup.objects.filter(
                deployment=deployment, ok=True, started_at__gt=killed_wall,
                trigger__in=["replica_restart", "recovery"],
            ).exists()  # fmt: skip
            return current.status == "warm" and warmed and bool(replicas - {victim["replica_id"]})

        converge(rewarmed, timeout=180, watch=[controller, web])
        rewarmed_after = time.monotonic() - killed_at
        wait_for(lambda: poller.since("predict", killed_at + rewarmed_after)
                 and poller.samples["predict"][-1].status == 200, timeout=60)  # fmt: skip
        time.sleep(1.0)
    report("replica killed", {"re-warmed": rewarmed_after})
    samples = poller.samples["predict"]
    print(f"predict: {statuses(samples)}")
    assert_pages_answered(poller, list(stack.page_polls(web)))
    assert_predicts_clean(samples, expected=labels)
    assert web.worker_pids() == web.workers
    assert_predicts_like_evaluation(web, stack.scientist.token, "intents", version)


def lease_of(controller: Proc) -> FleetLease | None:
    """The fleet lease, if ``controller`` holds it."""
    return FleetLease.objects.filter(
        pk="fleet", holder__contains=f":{controller.process.pid}:"
    ).first()


def test_a_controller_killed_mid_apply_is_taken_over_and_the_deployment_goes_warm(
    stack: Stack, packed: dict[str, PackedModel], shared_ray: str
) -> None:
    """Two controllers, one leading: SIGKILL the leader while it applies a new deployment;
    the standby takes the lease when it runs out and finishes the deployment."""
    leader = stack.controller(name="controller-a", ray_address=shared_ray)
    holder = wait_for(lambda: lease_of(leader), timeout=60)
    standby = stack.controller(name="controller-b", ray_address=shared_ray)
    wait_for(lambda: "starting" in standby.log(), timeout=60)
    web = stack.web()
    version = register(stack.scientist, stack.tenant, "intents", packed["base"])
    applied_before = (
        ServingPool.objects.filter(kind="classifier").values_list("applied_at", flat=True).first()
    )
    with Poller(web, stack.page_polls(web)) as poller:
        deployment = request_approval(stack.scientist, stack.reviewer, version)
        wait_for(lambda: Deployment.objects.get(pk=deployment.pk).status != "pending",
                 timeout=60, every=0.02)  # fmt: skip
        leader.kill()
        killed_at = time.monotonic()
        applied_at_kill = (
            ServingPool.objects.filter(kind="classifier")
            .values_list("applied_at", flat=True)
            .first()
        )
        status_at_kill = Deployment.objects.get(pk=deployment.pk).status
        took_over = converge(lambda: lease_of(standby), timeout=60, watch=[standby, web])
        takeover_after = time.monotonic() - killed_at
        converge(lambda: in_status(deployment.pk, "warm"), timeout=180, watch=[standby, web])
        warm_after = time.monotonic() - killed_at
    mid_apply = applied_at_kill == applied_before
    print(f"\nleader killed with the deployment {status_at_kill}, "
          f"{'during' if mid_apply else 'after'} its apply")  # fmt: skip
    report("controller killed", {"standby took over": takeover_after, "warm": warm_after})
    assert status_at_kill == "loading"
    assert took_over.holder != holder.holder
    assert_pages_answered(poller, list(stack.page_polls(web)))
    deployment.refresh_from_db()
    assert deployment.promotion is not None and deployment.promotion.status == "done"
    assert Deployment.objects.filter(promotion=deployment.promotion).count() == 1
    warmups = Warmup.objects.filter(deployment=deployment, trigger="deploy")
    assert [w.ok for w in warmups] == [True]
    assert_predicts_like_evaluation(web, stack.scientist.token, "intents", version)


class Forwarder:
    """A TCP forwarder from ``listen`` to ``target``: the network namespace reaches the
    test database (PostgreSQL on the host's loopback) through it, and nothing else."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((listen_host, 0))
        self.address = (listen_host, int(self.server.getsockname()[1]))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self.server.close()


@contextlib.contextmanager
def isolated_netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this host by a veth pair only: (name, host-side
    address, namespace-side address). From inside it the replicas' sockets cannot be
    reached and connections to them time out rather than being refused, as on a host of
    another network: the host's addresses are routed to a router that does not exist, and
    its own loopback (127.0.0.1, which replicas may publish) drops what arrives."""
    tag = secrets.token_hex(3)
    name, host_if, ns_if = f"wbf-{tag}", f"wbf{tag}h", f"wbf{tag}n"
    octet = int(tag[:2], 16)
    host_ip, ns_ip, no_router = (f"10.231.{octet}.{n}" for n in (1, 2, 5))

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    try:
        ip("netns", "add", name)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", f"{host_ip}/29", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/29", "dev", ns_if)
        ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        # Everything off the link goes to a router that is not there: the host's own
        # addresses (where replicas publish their sockets) are never reached.
        ip("netns", "exec", name, "ip", "route", "add", "default", "via", no_router)
        subprocess.run(["ip", "netns", "exec", name, "iptables", "-A", "INPUT", "-i", "lo",
                        "-j", "DROP"], check=True, capture_output=True, timeout=30)  # fmt: skip
        yield name, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)


def test_a_web_host_that_cannot_reach_the_fleet_answers_503_quickly_and_every_page_works(
    stack: Stack, packed: dict[str, PackedModel], shared_ray: str
) -> None:
    """The web process in a network namespace that reaches the database but not the
    replicas: predict answers 503 model_unavailable quickly, every other page answers."""
    stack.controller(ray_address=shared_ray)
    host_web = stack.web(name="web-host")
    version, _deployment = deploy(stack, packed["base"], "intents")
    wait_published(version)
    assert_predicts_like_evaluation(host_web, stack.scientist.token, "intents", version)
    forwarder = None
    with isolated_netns() as (netns, host_ip, ns_ip):
        database_url = stack.database_url
        from django.db import connection

        db = connection.settings_dict
        if not db["ENGINE"].endswith("sqlite3"):  # a file needs no network
            forwarder = Forwarder(host_ip, (db.get("HOST") or "127.0.0.1",
                                            int(db.get("PORT") or 5432)))  # fmt: skip
            target = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
            database_url = database_url.replace(target, f"{host_ip}:{forwarder.address[1]}")
        try:
            web = start_web(stack.tmp, database_url, name="web-netns", netns=netns,
                            bind_host=ns_ip)  # fmt: skip
            stack.processes.append(web)
            polls = {
                **stack.page_polls(web),
                "fleet api": lambda: http_call(
                    web,
                    "GET",
                    "/api/v1/fleet/",
                    headers={"Authorization": f"Bearer {stack.scientist.token}"},
                ),
                "predict": stack.predict_poll(web, "intents"),
            }
            with Poller(web, polls) as poller:
                time.sleep(8.0)
            web.stop()
        finally:
            if forwarder is not None:
                forwarder.close()
    samples = poller.samples["predict"]
    latencies = sorted(s.ms for s in samples)
    print(f"\n[unreachable fleet] {len(samples)} predicts, all {statuses(samples)}; latency "
          f"first {samples[0].ms:.0f} ms, p50 {latencies[len(latencies) // 2]:.1f} ms, "
          f"max {latencies[-1]:.0f} ms")  # fmt: skip
    reasons = {s.body["error"]["message"] for s in samples if isinstance(s.body, dict)}
    print("503 reasons: " + "; ".join(sorted(reasons)))
    print("latencies in order (ms): " + ", ".join(f"{s.ms:.0f}" for s in samples))
    assert_pages_answered(poller, [*stack.page_polls(web), "fleet api"])
    assert_predicts_clean(samples)
    assert {s.status for s in samples} == {503}
    # The same deployment still serves a host that reaches the fleet.
    assert_predicts_like_evaluation(host_web, stack.scientist.token, "intents", version)


def test_a_fresh_web_process_answers_its_first_predict_from_the_published_routes(
    stack: Stack, packed: dict[str, PackedModel], shared_ray: str
) -> None:
    """A web process started after the model went warm, with the controller gone: its
    first predict is answered (from the routes the controller published, straight to the
    replica) and it never loads Ray."""
    controller = stack.controller(ray_address=shared_ray)
    version, _deployment = deploy(stack, packed["base"], "intents")
    wait_published(version)
    controller.stop()  # nothing but the published routes is left to find the replica
    web = stack.web()
    headers = {"Authorization": f"Bearer {stack.scientist.token}"}
    path = "/api/v1/tenants/acme/models/intents/predict"
    timings = []
    for _ in range(21):
        started = time.perf_counter()
        status, _, raw = http_call(web, "POST", path, body={"inputs": GOLDEN_TEXTS[:1]},
                                   headers=headers)  # fmt: skip
        timings.append((time.perf_counter() - started) * 1000)
        assert status == 200, raw
    steady = sorted(timings[1:])[10]
    print(f"\n[fresh web process] first predict {timings[0]:.1f} ms, "
          f"then p50 {steady:.1f} ms ({timings[0] / steady:.2f}x)")  # fmt: skip
    assert_predicts_like_evaluation(web, stack.scientist.token, "intents", version)
    assert all(no_ray_in(pid) for pid in [web.process.pid, *web.worker_pids()])
