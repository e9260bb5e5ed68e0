"""What the embedding benchmarks share: a throwaway workbench in this process (Django on
SQLite, a private local Ray head, a scientist and a reviewer), StackFAQ read from the shared
datasets folder, retrieval dataset versions uploaded through the datasets service, embedding
runs trained by the workbench's own runner, deployments through approve -> index ->
warm-up (the fleet controller's passes and the index build in-process), and gunicorn (1
sync worker) serving the REST API."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, Process, commit, free_port
from benchmarks.predict_latency import Http, wait_http

STACKFAQ = Path(os.environ.get("STACKFAQ_DIR", ROOT.parent / "shared" / "datasets" / "stackfaq"))
BIN = Path(sys.executable).parent
# Each helper its own var dir (the contract's rule); each run a fresh folder in it.
VAR_ROOT = Path(os.environ.get("WORKBENCH_BENCH_ROOT", "/tmp/wb-bench"))
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
)


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str


def read_documents(path: Path | None = None) -> list[Doc]:
    with (path or STACKFAQ / "documents.csv").open(encoding="utf-8-sig", newline="") as fh:
        return [Doc(r["id"], r.get("title", "") or "", r["text"]) for r in csv.DictReader(fh)]


def read_pairs(name: str) -> list[tuple[str, str]]:
    with (STACKFAQ / name).open(encoding="utf-8-sig", newline="") as fh:
        return [(r["query"], r["document_id"]) for r in csv.DictReader(fh)]


def csv_bytes(header: Sequence[str], rows: Sequence[Sequence[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


class Actor:
    def __init__(self, user: Any) -> None:
        self.user = user


@dataclass
class Bench:
    """A throwaway workbench: this process's Django, a local Ray head, gunicorn."""

    var: Path = field(default_factory=lambda: _var_dir())
    head: Any = None
    tenant: Any = None
    scientist: Any = None
    reviewer: Any = None
    token: str = ""
    web: Process | None = None
    port: int = 0

    def start(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        for key in ENV_DROP:
            os.environ.pop(key, None)
        os.environ.update(
            {
                "WORKBENCH_VAR_DIR": str(self.var),
                "DJANGO_SETTINGS_MODULE": "workbench.settings",
                "WORKBENCH_TESTING": "0",
                "MLFLOW_TRACKING_URI": f"sqlite:///{self.var / 'mlflow.db'}",
                "LOG_LEVEL": "WARNING",
                "WORKBENCH_COMMIT": commit(),
            }
        )
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", interactive=False, verbosity=0)
        from apps.deployments import indexing
        from apps.tenants import services as tenants
        from apps.tenants.models import Role
        from apps.training import services as training

        self.tenant = tenants.tenant_create(actor=None, slug="bench", name="Embedding bench")
        users = {}
        for name, role in (("sci", Role.SCIENTIST), ("rev", Role.REVIEWER)):
            user = tenants.user_create(
                username=name, password=os.urandom(16).hex(), email=f"{name}@example.com"
            )
            tenants.membership_add(actor=None, tenant=self.tenant, user=user, role=role)
            users[name] = user
        self.scientist, self.reviewer = Actor(users["sci"]), Actor(users["rev"])
        self.token = tenants.token_create(user=users["sci"], name="bench").secret
        # The Celery hops are not measured: this process runs the tasks' bodies itself.
        training._enqueue_dispatch = lambda: None
        training._send_run = lambda run_id: None
        indexing._send = lambda deployment_id, staged: indexing.build(  # type: ignore[assignment]
            deployment_id=deployment_id, staged=staged
        )

    def retrieval_version(
        self, name: str, pairs: Sequence[tuple[str, str]], documents: Sequence[Doc]
    ) -> Any:
        """A retrieval dataset version uploaded through the datasets service."""
        from django.conf import settings

        from apps.datasets.services import UploadedFile, dataset_create, dataset_version_create

        dataset = dataset_create(
            actor=self.scientist.user, tenant=self.tenant, name=name, kind="training",
            task="retrieval",
        )  # fmt: skip

        def upload(filename: str, data: bytes) -> UploadedFile:
            path = Path(tempfile.mkdtemp(dir=settings.UPLOAD_TMP_DIR)) / filename
            path.write_bytes(data)  # the store moves it in
            return UploadedFile(path, hashlib.sha256(data).hexdigest(), len(data), filename)

        pairs_file = upload("pairs.csv", csv_bytes(["query", "document_id"], pairs))
        docs_file = upload(
            "documents.csv",
            csv_bytes(["id", "title", "text"], [[d.id, d.title, d.text] for d in documents]),
        )
        return dataset_version_create(
            actor=self.scientist.user, dataset=dataset, path=pairs_file.path,
            sha256=pairs_file.sha256, size_bytes=pairs_file.size_bytes,
            filename=pairs_file.filename, text_column="query", label_column="document_id",
            documents=docs_file,
        ).version  # fmt: skip

    def train(
        self, version: Any, model_name: str, given: dict[str, Any], *, base_model: str = ""
    ) -> tuple[Any, float]:
        """A run of ``base_model`` (default minilm-l6-embed) with the catalogue's defaults
        under ``given``, executed by the workbench's runner in this process: (the registered
        version, wall seconds)."""
        from apps.registry.models import ModelVersion
        from apps.training import runner, services
        from apps.training.models import TrainingRun
        from apps.training.params import params_resolve
        from worker import base_models

        base_model = base_model or base_models.MINILM_L6_EMBED
        params, problems = params_resolve(base_model=base_model, given=given)
        if problems:
            raise ValueError(f"parameters refused: {problems}")
        run = services.run_launch(
            actor=self.scientist.user, tenant=self.tenant, dataset_version=version,
            base_model=base_model, params=params, model_name=model_name,
        )  # fmt: skip
        if run.pk not in services.runs_dispatch():
            raise RuntimeError(f"run {run.pk} was not dispatched")
        started = time.perf_counter()
        status = runner.execute(run.pk, worker="bench:1")
        wall = time.perf_counter() - started
        if status != "succeeded":
            raise RuntimeError(
                f"run {run.pk} ended {status}:\n{TrainingRun.objects.get(pk=run.pk).error}"
            )
        return ModelVersion.objects.get(run_id=run.pk), wall

    def ensure_ray(self) -> None:
        """The local Ray head, started when first needed (not beside a training run); a
        busy 2-core host can miss ``ray start``'s deadline, so up to five tries, each
        later than the last."""
        if self.head is not None:
            return
        from django.conf import settings

        from apps.deployments.backends import reset_backend
        from apps.deployments.dataplane import reset_data_plane
        from worker.serving import local_ray

        head = None
        for attempt in range(1, 6):
            print(f"starting a local Ray head (try {attempt}) ...", flush=True)
            try:
                head = local_ray.ensure_head(self.var / f"ray{attempt}", num_cpus=2)
                break
            except RuntimeError as exc:
                print(f"   {str(exc)[-600:]}", flush=True)  # why, before the next try
                if attempt == 5:
                    raise
                time.sleep(10 * attempt)  # a neighbour's head starting at the same moment
        assert head is not None
        self.head = head
        local_ray.use_head_auth(head)  # this process and gunicorn authenticate to it
        os.environ["RAY_ADDRESS"] = head.address
        settings.RAY_ADDRESS = head.address
        reset_backend()
        reset_data_plane()

    def deploy(self, version: Any) -> Any:
        """Approved for production: the index built, the replica warm, routes published."""
        from apps.deployments.models import Deployment
        from tests.deploy_helpers import approve

        self.ensure_ray()

        deployment = approve(self.scientist, self.reviewer, version, "production")
        deployment = Deployment.objects.get(pk=deployment.pk)
        if deployment.status != "warm":
            raise RuntimeError(f"the deployment is {deployment.status}: {deployment.failure}")
        return deployment

    def start_web(self, workers: int = 1) -> Http:
        """gunicorn on a free port (``workers`` sync workers; 1 unless a benchmark sends
        concurrent requests), once it answers /healthz."""
        self.port = free_port()
        self.web = Process(
            "gunicorn",
            [str(BIN / "gunicorn"), "-c", "workbench/gunicorn_conf.py", "--workers", str(workers),
             "--bind", f"127.0.0.1:{self.port}", "workbench.wsgi"],
            {**os.environ, "PYTHONPATH": str(ROOT)}, self.var / "gunicorn.log",
        )  # fmt: skip
        self.web.start()
        wait_http(self.port, "/healthz", 120)
        return self.client()

    def client(self) -> Http:
        return Http(
            self.port,
            {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        if self.head is not None:
            from worker.serving import local_ray
            from worker.serving.fleet import close_all

            close_all()
            local_ray.stop_head(self.head.pid)
        shutil.rmtree(self.var, ignore_errors=True)


def _var_dir() -> Path:
    VAR_ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="embedding-", dir=VAR_ROOT))


def load_avg() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (5 min {five:.2f})"
