"""Nothing that web or Celery processes load imports ``ray`` (issue 11): only the fleet
controller (``manage.py fleet_controller``) and the replica code do. A web or worker process
that is a Ray driver dies with the Ray head it knew; these never are.

Checked in a fresh interpreter, as a web process and a Celery worker start: Django set
up, the WSGI application and the URLconf loaded, every app module imported (but the fleet
controller's own), the Celery app's tasks autodiscovered; then it serves a predict through
the whole API path (the routes published on the pool row, straight to a replica socket: a
stand-in replica speaking the fast-path protocol), a 503 for a replica that is gone, and
the pages that show the fleet; and ``ray`` is still not in ``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apps.datasets.models import Dataset, DatasetVersion
from apps.deployments.models import Deployment
from apps.registry.services import model_version_create
from apps.training.models import TrainingRun
from tests.conftest import Actor, make_actor

ROOT = Path(__file__).resolve().parent.parent
# The fleet controller's modules: the one process that may drive Ray.
CONTROLLER_MODULES = {
    "apps.deployments.controller",
    "apps.deployments.management.commands.fleet_controller",
}

CHILD = r"""
import asyncio, importlib, json, pathlib, sys, threading

import django

django.setup()

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

import workbench.wsgi  # noqa: F401 - what gunicorn loads
get_wsgi_application()
get_resolver().url_patterns  # the URLconf and every urls module it includes

from workbench.celery import app

app.loader.import_default_modules()  # what a worker does at start: autodiscovery
app.finalize()
tasks = sorted(name for name in app.tasks if not name.startswith("celery."))

controller_modules = set(json.loads(sys.argv[1]))
imported = []
for path in sorted(pathlib.Path("apps").rglob("*.py")):
    if "migrations" in path.parts:
        continue
    name = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
    if name in controller_modules:
        continue
    importlib.import_module(name)
    imported.append(name)
after_imports = "ray" in sys.modules

from django.test import Client

from apps.deployments.models import ServingPool
from django.contrib.auth import get_user_model
from worker.serving.fastpath import FastServer

ids = json.loads(sys.argv[2])


async def answer(model_id, texts):
    return {"outputs": [{"label": "card_arrival", "score": 0.9} for _ in texts],
            "replica_id": "stand-in"}


loop = asyncio.new_event_loop()
replica = FastServer(answer, replica_id="stand-in")
loop.run_until_complete(replica.start("127.0.0.1"))
threading.Thread(target=loop.run_forever, daemon=True).start()
route = {"deployment": "classifier-set-0", "sha256": ids["sha256"]}
endpoint = {"replica_id": "stand-in", **replica.published()}
from apps.deployments.fleet import pool_for

pool_for("classifier")
ServingPool.objects.filter(kind="classifier").update(routes={
    "models": {ids["version"]: route},
    "endpoints": {"classifier-set-0": [endpoint]},
})

api = Client(HTTP_AUTHORIZATION=f"Bearer {ids['token']}")
path = "/api/v1/tenants/acme/models/intents/predict"
served = api.post(path, {"inputs": ["my card has not arrived"]},
                  content_type="application/json")
# The replica goes away: its socket no longer answers.
ServingPool.objects.filter(kind="classifier").update(routes={
    "models": {ids["version"]: route},
    "endpoints": {"classifier-set-0": [{**endpoint, "port": ids["closed_port"]}]},
})
from apps.deployments.dataplane import data_plane

data_plane()._tables.clear()  # the next predict reads the routes again
gone = api.post(path, {"inputs": ["my card has not arrived"]},
                content_type="application/json")
pages = Client()
pages.force_login(get_user_model().objects.get(username="sam"))
answers = {p: pages.get(p).status_code for p in (
    "/healthz", "/fleet/", "/t/acme/deployments/", "/api/v1/fleet/", "/metrics",
    "/api/v1/base-models/",
)}
print(json.dumps({
    "ray_after_imports": after_imports,
    "ray_loaded": "ray" in sys.modules,
    "torch_loaded": sorted(m for m in ("torch", "transformers") if m in sys.modules),
    "ray_modules": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")),
    "imported": imported,
    "tasks": tasks,
    "predict": [served.status_code, served.json()],
    "gone": [gone.status_code, gone.json(), gone.headers.get("Retry-After")],
    "pages": answers,
}))
"""


def warm_deployment(scientist: Actor, tenant: Any) -> Deployment:
    """A warm deployment of a model version, as rows only (no artifact, no fleet)."""
    dataset = Dataset.objects.create(tenant=tenant, name="intents-data", kind="training")
    data = DatasetVersion.objects.create(
        dataset=dataset, number=1, sha256="0" * 64, size_bytes=1, rows=10, format="csv",
        storage_key="x/intents", text_column="text", label_column="label", labels={"a": 10},
        duplicate_texts=0, preview=[],
    )  # fmt: skip
    run = TrainingRun.objects.create(
        tenant=tenant, dataset_version=data, model_name="intents", base_model="tiny-bert",
        params={}, status="succeeded", created_by=scientist.user,
    )  # fmt: skip
    version = model_version_create(
        run=run, artifact_key="models/acme/x/model.tar", sha256="1" * 64, size_bytes=1,
        memory_bytes=4, predictions_key="", labels=["card_arrival"], metrics={},
    )  # fmt: skip
    return Deployment.objects.create(
        tenant=tenant, model_version=version, environment="production", status="warm",
        artifact_sha256=version.sha256,
    )  # fmt: skip


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.django_db(transaction=True)
def test_web_and_celery_processes_never_load_ray(
    tenant: Any, scientist: Actor, worker_database_url: str
) -> None:
    assert importlib.util.find_spec("ray") is not None  # it could be imported: it is not
    make_actor("stella", None, None, is_staff=True)
    deployment = warm_deployment(scientist, tenant)
    ids = {"version": deployment.model_version_id, "sha256": deployment.artifact_sha256,
           "token": scientist.token, "closed_port": closed_port()}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST"))}
    env.update(
        {
            "DATABASE_URL": worker_database_url,
            "DJANGO_SETTINGS_MODULE": "workbench.settings",
            "PYTHONPATH": str(ROOT),
        }
    )
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(sorted(CONTROLLER_MODULES)), json.dumps(ids)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    # It loaded what web and workers load ...
    assert {"apps.deployments.views", "apps.deployments.api", "apps.deployments.dataplane",
            "apps.training.tasks", "apps.promotions.tasks"} <= set(result["imported"])  # fmt: skip
    assert {"training.execute_run", "training.dispatch"} <= set(result["tasks"])  # autodiscovered
    status, body = result["predict"]
    assert status == 200, body
    assert [o["label"] for o in body["outputs"]] == ["card_arrival"]
    status, body, retry_after = result["gone"]
    assert status == 503 and body["error"]["code"] == "model_unavailable" and retry_after
    assert set(result["pages"].values()) == {200}, result["pages"]
    # ... and none of it brought Ray in.
    assert result["ray_after_imports"] is False
    assert result["ray_loaded"] is False, result["ray_modules"][:20]
    # Nor torch: the base-model catalogue is counted from shapes (a web process that
    # imported torch for it paid seconds and hundreds of MB on that request).
    assert result["torch_loaded"] == []
