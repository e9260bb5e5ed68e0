"""Shared fixtures: two tenants, users of every role, API clients with real tokens.

``tenant`` (acme) has admin, reviewer, scientist and viewer members; ``other_tenant``
(globex) has its own admin, the outsider every isolation test uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from apps.tenants import services as tenant_services
from apps.tenants.models import Role, Tenant

# A real JupyterHub on loopback (session fixture ``jupyterhub``, per test ``hub_settings``).
pytest_plugins = ["tests.hub"]

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "banking77"
PASSWORD = "correct-horse-battery-staple"


@dataclass
class Actor:
    user: Any
    token: str
    client: Client

    def api(self, method: str, path: str, data: Any = None, **extra: Any) -> Any:
        call = getattr(self.client, method.lower())
        if data is not None and "format" not in extra and not extra.pop("multipart", False):
            extra["content_type"] = "application/json"
        return call(path, data, **extra) if data is not None else call(path, **extra)


def make_actor(
    username: str, tenant: Tenant | None, role: Role | None, *, is_staff: bool = False
) -> Actor:
    user = tenant_services.user_create(
        username=username, password=PASSWORD, email=f"{username}@example.com", is_staff=is_staff
    )
    if tenant is not None and role is not None:
        tenant_services.membership_add(actor=None, tenant=tenant, user=user, role=role)
    secret = tenant_services.token_create(user=user, name=f"{username}-test").secret
    return Actor(user=user, token=secret, client=Client(HTTP_AUTHORIZATION=f"Bearer {secret}"))


@pytest.fixture
def tenant(db: Any) -> Tenant:
    return tenant_services.tenant_create(
        actor=None, slug="acme", name="Acme Corp", domain="banking"
    )


@pytest.fixture
def other_tenant(db: Any) -> Tenant:
    return tenant_services.tenant_create(actor=None, slug="globex", name="Globex", domain="retail")


@pytest.fixture
def admin(tenant: Tenant) -> Actor:
    return make_actor("ada", tenant, Role.ADMIN)


@pytest.fixture
def reviewer(tenant: Tenant) -> Actor:
    return make_actor("rita", tenant, Role.REVIEWER)


@pytest.fixture
def scientist(tenant: Tenant) -> Actor:
    return make_actor("sam", tenant, Role.SCIENTIST)


@pytest.fixture
def viewer(tenant: Tenant) -> Actor:
    return make_actor("vic", tenant, Role.VIEWER)


@pytest.fixture
def outsider(other_tenant: Tenant) -> Actor:
    return make_actor("otto", other_tenant, Role.ADMIN)


@pytest.fixture
def staff(db: Any) -> Actor:
    return make_actor("stella", None, None, is_staff=True)


@pytest.fixture
def artifacts_dir(settings: Any, tmp_path: Path) -> Path:
    """A private artifact store per test, so stored objects can be counted exactly."""
    root = tmp_path / "artifacts"
    settings.ARTIFACT_STORE = f"file://{root}"
    # Private upload temp dir too, so "no temp file left behind" is checked exactly.
    settings.UPLOAD_TMP_DIR = tmp_path / "uploads"
    settings.UPLOAD_TMP_DIR.mkdir()
    return root


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def upload(artifacts_dir: Path) -> Callable[..., Any]:
    """POST a new dataset version: ``upload(actor, dataset_id, filename, content, **fields)``."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    def do(
        actor: Actor,
        dataset_id: str,
        filename: str,
        content: bytes,
        tenant_slug: str = "acme",
        **fields: Any,
    ) -> Any:
        data = {"file": SimpleUploadedFile(filename, content), **fields}
        return actor.client.post(
            f"/api/v1/tenants/{tenant_slug}/datasets/{dataset_id}/versions/", data
        )

    return do


@pytest.fixture
def training_dataset(scientist: Actor) -> str:
    response = scientist.api(
        "post",
        "/api/v1/tenants/acme/datasets/",
        {"name": "support-intents", "kind": "training", "domain": "banking"},
    )
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


@pytest.fixture
def golden_dataset(reviewer: Actor) -> str:
    """A golden set of acme, created by its reviewer (only reviewers and admins create and
    change golden and sample sets)."""
    response = reviewer.api(
        "post", "/api/v1/tenants/acme/datasets/", {"name": "golden-intents", "kind": "golden"}
    )
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


# --- a real Celery worker process ------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """A failed test that used the real worker shows the worker's log tail: what the worker
    was doing is most of what there is to know about a test that waited in vain."""
    outcome = yield
    report = outcome.get_result()
    worker = getattr(item, "funcargs", {}).get("celery_worker_process")
    if report.failed and worker is not None:
        lines = [line[:400] for line in worker.log().splitlines()[-60:]]
        report.sections.append(("celery worker log (last 60 lines)", "\n".join(lines)))


@dataclass
class WorkerProcess:
    process: Any
    log_path: Path
    artifacts_root: Path
    start_kwargs: dict[str, Any] | None = None
    node: str = ""  # the worker's node name, for control commands

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _database_url_for_subprocess() -> str:
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_mlflow(tmp: Path, *extra_args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on loopback (SQLite store, served artifacts under ``tmp``)
    with ``extra_args``, in ``env`` (default: this process's); yields its URL."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log_path = tmp / "mlflow.log"
    env = {
        **(os.environ if env is None else env),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", *extra_args, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
             "--artifacts-destination", f"file://{tmp / 'artifacts'}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: Any) -> Iterator[str]:
    """A real MLflow tracking server on loopback (SQLite store, served artifacts)."""
    with running_mlflow(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def start_worker(
    *,
    tmp: Path,
    database_url: str,
    mlflow_url: str,
    artifacts_root: Path,
    queues: str = "default,gpu",
    name: str = "test",
    extra_env: dict[str, str] | None = None,
    beat: bool = False,
) -> WorkerProcess:
    """Start ``celery -A workbench worker`` on the test database and broker; wait for it."""
    import os
    import subprocess
    import sys
    import time

    from django.conf import settings as dj_settings

    log_path = tmp / f"{name}.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ARTIFACT_STORE": f"file://{artifacts_root}",
        "CELERY_BROKER_URL": dj_settings.CELERY_BROKER_URL,
        "PROMETHEUS_MULTIPROC_DIR": os.environ["PROMETHEUS_MULTIPROC_DIR"],
        "MLFLOW_TRACKING_URI": mlflow_url,
        "TRAINING_WORK_DIR": str(tmp / f"{name}-work"),
        **(extra_env or {}),
    }
    import socket

    node = f"{name}-{os.getpid()}@{socket.gethostname()}"
    command = [sys.executable, "-m", "celery", "-A", "workbench", "worker", "-Q", queues,
               "--concurrency", "1", "--loglevel", "INFO", "-n", node]  # fmt: skip
    if beat:
        command += ["-B", "-s", str(tmp / f"{name}-beat-schedule")]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=str(dj_settings.BASE_DIR), env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 90
    while "ready." not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"celery worker did not start:\n{log_path.read_text()}")
        time.sleep(0.2)
    return WorkerProcess(
        process=process,
        log_path=log_path,
        artifacts_root=artifacts_root,
        node=node,
        start_kwargs={"tmp": tmp, "database_url": database_url, "mlflow_url": mlflow_url,
                      "artifacts_root": artifacts_root, "queues": queues,
                      "extra_env": extra_env},
    )  # fmt: skip


def stop_worker(worker: WorkerProcess, *, kill: bool = False) -> None:
    import os
    import signal
    import subprocess

    try:
        os.killpg(worker.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        worker.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=10)


def wait_worker_idle(worker: WorkerProcess, *, timeout: float) -> bool:
    """Wait until the worker runs and holds no task; False if it still does at ``timeout``
    (or does not answer)."""
    import time

    from workbench.celery import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            return True  # gone: nothing of it can run into the next test
        inspect = app.control.inspect(destination=[worker.node], timeout=1.0, limit=1)
        active = (inspect.active() or {}).get(worker.node)
        reserved = (inspect.reserved() or {}).get(worker.node)
        if active == [] and reserved == []:
            return True
        time.sleep(0.5)
    return False


# The session's real worker, once started: every test after that shares it.
_LIVE_WORKERS: list[WorkerProcess] = []


@contextlib.contextmanager
def live_workers_paused() -> Iterator[None]:
    """The session's real workers stopped (SIGSTOP) while inside, each once idle, resumed
    after. For a test that runs a worker of its own on the shared database: any worker that
    runs ``training.dispatch_runs`` dispatches every tenant's queued runs to its own broker,
    and the session's worker would then take the test's runs and fail them (its artifact
    store is another)."""
    import os
    import signal

    paused = []
    for worker in list(_LIVE_WORKERS):
        wait_worker_idle(worker, timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGSTOP)
            paused.append(worker)
    try:
        yield
    finally:
        for worker in paused:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGCONT)


def _commits(request: Any) -> bool:
    """Whether the test's transactions really commit (so its on-commit tasks are sent)."""
    names = set(request.fixturenames)
    if names & {"celery_worker_process", "transactional_db", "live_server"}:
        return True
    marker = request.node.get_closest_marker("django_db")
    return bool(marker and (marker.kwargs.get("transaction") or marker.args[:1] == (True,)))


@pytest.fixture(autouse=True)
def _worker_settles(request: Any) -> Any:
    """Once the session's real worker runs, wait after each committing test for the tasks
    the test left to end (a deployment's follow-up pool update; any task its commits sent,
    which that worker takes too), so the next test starts on an idle worker rather than
    queued behind them. A worker still busy after three minutes is reported with what it
    was doing."""
    yield
    if not _LIVE_WORKERS or not _commits(request):
        return
    import warnings

    for worker in _LIVE_WORKERS:
        if wait_worker_idle(worker, timeout=180):
            continue
        tail = [line[:300] for line in worker.log().splitlines()[-30:]]
        warnings.warn(
            "the celery worker was still busy 180 s after the test:\n" + "\n".join(tail),
            stacklevel=1,
        )


@pytest.fixture(scope="session")
def worker_database_url(django_db_setup: Any, django_db_blocker: Any) -> str:
    with django_db_blocker.unblock():
        return _database_url_for_subprocess()


@pytest.fixture(scope="session")
def celery_worker_process(
    worker_database_url: str, mlflow_server: str, ray_address: str, tmp_path_factory: Any
):
    """``celery -A workbench worker -Q default,gpu`` against the test database and broker,
    deploying to the session's Ray (without RAY_ADDRESS a deployment task would start an
    embedded Ray of its own)."""
    from workbench.celery import app

    # Start from an empty queue: leftovers of earlier runs would run against this test DB.
    app.control.purge()
    tmp = tmp_path_factory.mktemp("worker")
    worker = start_worker(
        tmp=tmp,
        database_url=worker_database_url,
        mlflow_url=mlflow_server,
        artifacts_root=tmp / "artifacts",
        # Heartbeats come every second; a run or evaluation silent for 5 s lost its worker.
        extra_env={
            "TRAINING_HEARTBEAT_TIMEOUT_SECONDS": "5",
            "EVALUATION_HEARTBEAT_TIMEOUT_SECONDS": "5",
            "BATCH_HEARTBEAT_TIMEOUT_SECONDS": "5",
            "RAY_ADDRESS": ray_address,
        },
    )
    _LIVE_WORKERS.append(worker)
    yield worker
    _LIVE_WORKERS.remove(worker)
    stop_worker(worker)


# --- a tiny autocomplete model ------------------------------------------------------------


@pytest.fixture(scope="session")
def autocomplete_packed(tmp_path_factory: Any) -> Any:
    """The tiny packed GPT-2 of ``tests/worker/serving/autocomplete_models.py``, trained
    once per session for the serving, API, fleet and browser tests (seconds each time)."""
    from tests.worker.serving.autocomplete_models import tiny_autocomplete

    return tiny_autocomplete(tmp_path_factory.mktemp("autocomplete"))


# --- a real Ray head ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: Any):
    """One private Ray head for the whole test session (``ray start --head --block`` in its
    own session, with its own short temp dir); torn down by stopping only the processes it
    started. Never ``ray stop``: that stops every Ray on the machine. Starting Ray takes
    ~20 s and ~1 GB, hence one per session."""
    import os
    import uuid

    from worker.serving import local_ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    head = local_ray.start_head(
        temp_dir=local_ray.short_temp_dir(f"pytest-{os.getpid()}-{uuid.uuid4()}"),
        log_path=tmp_path_factory.mktemp("ray") / "ray-head.log",
        num_cpus=4,
    )
    local_ray.use_head_auth(head)  # this process and the workers it starts
    yield head.address
    import ray
    from ray._private import auto_init_hook

    from worker.serving import fleet

    # Serve's driver threads outlive the test; without this they would start a new Ray.
    auto_init_hook.enable_auto_connect = False
    fleet.close_all()
    if ray.is_initialized():
        ray.shutdown()
    local_ray.stop_head(head.pid)
    import shutil

    shutil.rmtree(head.temp_dir, ignore_errors=True)


# --- the real fleet controller -----------------------------------------------------------


@dataclass
class ControllerProcess:
    process: Any
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_fleet_controller(
    *,
    tmp: Path,
    database_url: str,
    artifacts_root: Path,
    extra_env: dict[str, str] | None = None,
    name: str = "controller",
) -> ControllerProcess:
    """``manage.py fleet_controller`` on the test database (its own process: the only Ray
    driver of a real deployment), passing every second; returns once it runs."""
    import os
    import subprocess
    import sys
    import time

    from django.conf import settings as dj_settings

    log_path = tmp / f"{name}.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ARTIFACT_STORE": f"file://{artifacts_root}",
        "CELERY_BROKER_URL": dj_settings.CELERY_BROKER_URL,
        "WORKBENCH_VAR_DIR": str(tmp / f"{name}-var"),
        "FLEET_RECONCILE_SECONDS": "1",
        "FLEET_LEASE_SECONDS": "5",
        **(extra_env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "fleet_controller"], cwd=str(dj_settings.BASE_DIR),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while "starting" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"fleet controller did not start:\n{log_path.read_text()}")
        time.sleep(0.2)
    return ControllerProcess(process=process, log_path=log_path)


def stop_fleet_controller(controller: ControllerProcess, *, kill: bool = False) -> None:
    import os
    import signal
    import subprocess

    try:
        os.killpg(controller.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        controller.process.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(controller.process.pid, signal.SIGKILL)
        controller.process.wait(timeout=10)


@pytest.fixture
def fleet_controller_process(
    worker_database_url: str, ray_address: str, celery_worker_process: WorkerProcess,
    tmp_path: Path,
):  # fmt: skip
    """The real fleet controller on the session's Ray, for one test; stopped (its lease
    released) after it, so later tests may run controller passes in-process."""
    controller = start_fleet_controller(
        tmp=tmp_path, database_url=worker_database_url,
        artifacts_root=celery_worker_process.artifacts_root,
        extra_env={"RAY_ADDRESS": ray_address},
    )  # fmt: skip
    yield controller
    stop_fleet_controller(controller)
