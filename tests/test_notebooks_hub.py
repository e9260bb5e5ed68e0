"""Notebooks end to end on a real JupyterHub (loopback, local-process spawner).

The workbench starts a named server through the hub's REST API; code executed in that
server's kernel uses ``workbench.client`` with the token the server got: it downloads a
granted dataset version, is refused an ungranted one (by the workbench, not by the
client), and cannot reach the ordinary dataset routes. Stopping the server revokes the
token. A server the real idle culler stops loses its token at the next sync.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

from apps.datasets.models import DatasetVersion
from apps.notebooks import services
from apps.notebooks.models import NotebookServer, NotebookStatus
from apps.tenants.models import ApiToken
from tests.conftest import Actor
from tests.hub import Hub, execute
from tests.training_helpers import banking_slice

pytestmark = pytest.mark.django_db(transaction=True)


def make_version(actor: Actor, upload: Any, name: str, content: bytes) -> DatasetVersion:
    created = actor.api(
        "post", "/api/v1/tenants/acme/datasets/", {"name": name, "kind": "training"}
    )
    assert created.status_code == 201, created.content
    response = upload(actor, created.json()["id"], f"{name}.csv", content)
    assert response.status_code == 201, response.content
    return DatasetVersion.objects.get(pk=response.json()["id"])


def grant(scientist: Actor, reviewer: Actor, version: DatasetVersion) -> None:
    asked = scientist.api(
        "post",
        "/api/v1/tenants/acme/data-access/",
        {"dataset": version.dataset_id, "purpose": "explore intents in a notebook"},
    )
    assert asked.status_code == 201, asked.content
    granted = reviewer.api(
        "post", f"/api/v1/tenants/acme/data-access/{asked.json()['id']}/grant", {"comment": "ok"}
    )
    assert granted.status_code == 200, granted.content


def wait_running(actor: Actor, notebook_id: str, hub: Hub, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = actor.api("get", f"/api/v1/tenants/acme/notebooks/{notebook_id}/").json()
        if body["status"] == "running":
            return body
        if body["status"] in ("failed", "stopped") or time.monotonic() > deadline:
            raise AssertionError(f"server ended as {body}; hub log:\n{hub.log()[-4000:]}")
        time.sleep(0.5)


KERNEL_CODE = """
import hashlib, json, os
from workbench.client import Workbench, WorkbenchError
wb = Workbench()
report = {{"granted": [d.id for d in wb.datasets()], "attached": wb.attached(),
          "mlflow": os.environ.get("MLFLOW_TRACKING_URI"), "token": os.environ["WORKBENCH_TOKEN"]}}
path = wb.download({granted!r})
report["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
report["rows"] = len(wb.load({granted!r}))
# Results persist: a file the notebook writes becomes a new version of a tenant dataset.
with open("results.csv", "w") as out:
    out.write("text,label\\nwhere is my card,card_arrival\\nI lost my card,lost_card\\n")
report["uploaded"] = wb.upload({dataset!r}, "results.csv")["id"]
for name, call in [
    ("ungranted", lambda: wb.download({ungranted!r})),
    ("raw_route", lambda: wb._json("GET", wb._tenant_path("datasets/"))),
    ("run_on_ungranted", lambda: wb.launch_run({ungranted!r})),
]:
    try:
        call()
        report[name] = "allowed"
    except WorkbenchError as exc:
        report[name] = [exc.status, exc.message]
print(json.dumps(report))
"""


def test_a_spawned_server_reads_granted_data_only_and_its_token_dies_with_it(
    hub_settings: Hub, scientist: Actor, reviewer: Actor, upload: Any
) -> None:
    hub = hub_settings
    granted = make_version(scientist, upload, "granted-intents", banking_slice())
    other_rows = banking_slice(labels=4, offset=30)
    ungranted = make_version(scientist, upload, "secret-intents", other_rows)
    grant(scientist, reviewer, granted)

    started = scientist.api("post", "/api/v1/tenants/acme/notebooks/", {"datasets": [granted.pk]})
    assert started.status_code == 202, started.content
    body = wait_running(scientist, started.json()["id"], hub)
    assert body["url"].startswith(f"{hub.url}/user/sam/nb-")
    assert [d["id"] for d in body["datasets"]] == [granted.pk]
    server = NotebookServer.objects.get(pk=body["id"])
    assert server.token is not None and server.token.tenant.slug == "acme"

    out = execute(
        hub,
        server.url,
        KERNEL_CODE.format(granted=granted.pk, ungranted=ungranted.pk, dataset=granted.dataset_id),
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["granted"] == [granted.pk]
    assert report["attached"] == [granted.pk]
    assert report["sha256"] == granted.sha256
    assert report["rows"] == granted.rows
    assert report["ungranted"][0] == 403 and "no access grant" in report["ungranted"][1]
    assert report["raw_route"][0] == 403 and "notebook" in report["raw_route"][1]
    assert report["run_on_ungranted"][0] == 403 and "not granted" in report["run_on_ungranted"][1]
    assert report["mlflow"] == hub_settings_mlflow()
    secret = report["token"]
    assert ApiToken.objects.get(pk=server.token_id).token_hash != secret  # stored hashed

    # The token works from outside too, until the server stops.
    from django.test import Client

    outside = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert outside.get("/api/v1/tenants/acme/granted-data/").status_code == 200

    stopped = scientist.api("delete", f"/api/v1/tenants/acme/notebooks/{server.pk}/")
    assert stopped.status_code == 200, stopped.content
    assert stopped.json()["status"] == "stopped"
    assert outside.get("/api/v1/tenants/acme/granted-data/").status_code == 401
    # What the notebook uploaded outlives it.
    uploaded = DatasetVersion.objects.get(pk=report["uploaded"])
    assert uploaded.dataset_id == granted.dataset_id and uploaded.rows == 2
    status, user = hub.api("GET", "/users/sam")
    assert status == 200 and server.server_name not in user["servers"]


def hub_settings_mlflow() -> str:
    from django.conf import settings

    return str(settings.MLFLOW_TRACKING_URI)


def test_a_server_the_idle_culler_stops_loses_its_token_at_the_next_sync(
    hub_settings: Hub, scientist: Actor
) -> None:
    hub = hub_settings
    started = scientist.api("post", "/api/v1/tenants/acme/notebooks/", {})
    assert started.status_code == 202, started.content
    wait_running(scientist, started.json()["id"], hub)
    server = NotebookServer.objects.get(pk=started.json()["id"])
    # The real culler, as the hub runs it, with an idle timeout of one second.
    culler = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub_idle_culler", f"--url={hub.url}/hub/api",
         "--timeout=1", "--cull-every=2", "--remove-named-servers=True"],
        env={"JUPYTERHUB_API_TOKEN": hub.culler_token, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while server.server_name in (hub.api("GET", "/users/sam")[1]["servers"] or {}):
            assert time.monotonic() < deadline, hub.log()[-3000:]
            time.sleep(1)
    finally:
        culler.terminate()
        culler.wait(timeout=10)
    assert services.notebooks_sync() == 1
    server.refresh_from_db()
    assert server.status == NotebookStatus.STOPPED and server.stop_reason == "ended_in_hub"
    assert ApiToken.objects.get(pk=server.token_id).revoked_at is not None


def test_the_hub_refuses_a_server_not_started_by_the_workbench(hub_settings: Hub) -> None:
    hub = hub_settings
    assert hub.api("POST", "/users/mallory")[0] in (201, 409)
    status, body = hub.api("POST", "/users/mallory/servers/own", {})
    assert status == 400
    assert "from the workbench" in body["message"]


def test_a_server_left_without_a_row_is_stopped_by_the_sweep(
    hub_settings: Hub, scientist: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if a start's commit had failed after the hub accepted the spawn.
    hub = hub_settings
    assert hub.api("POST", "/users/sam")[0] in (201, 409)
    options = {"user_options": {"env": {"WORKBENCH_TOKEN": "rolled-back"}}}
    assert hub.api("POST", "/users/sam/servers/nb-orphan", options)[0] in (201, 202)
    deadline = time.monotonic() + 90
    while not (hub.api("GET", "/users/sam")[1]["servers"].get("nb-orphan") or {}).get("ready"):
        assert time.monotonic() < deadline, hub.log()[-3000:]
        time.sleep(0.5)
    assert services.notebooks_sync() == 0
    assert "nb-orphan" in hub.api("GET", "/users/sam")[1]["servers"]  # too young to judge
    monkeypatch.setattr(services, "ORPHAN_AFTER", timedelta(0))
    services.notebooks_sync()
    deadline = time.monotonic() + 60
    while "nb-orphan" in (hub.api("GET", "/users/sam")[1]["servers"] or {}):
        assert time.monotonic() < deadline, hub.log()[-3000:]
        time.sleep(0.5)
