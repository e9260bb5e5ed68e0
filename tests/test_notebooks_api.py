"""Data-access requests, granted data, notebook tokens and the refusals of notebooks/.

No hub runs here: a start that gets past validation meets a hub that is down (a closed
port) or not configured, and must leave nothing behind. Spawning on a real hub is in
test_notebooks_hub.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.datasets.models import DatasetVersion
from apps.notebooks import services
from apps.notebooks.models import DataAccessRequest, NotebookServer, NotebookStatus
from apps.tenants.models import ApiToken
from apps.tenants.services import token_create
from tests.conftest import Actor, free_port
from tests.training_helpers import banking_slice, make_training_version

pytestmark = pytest.mark.django_db
BASE = "/api/v1/tenants/acme"


@pytest.fixture
def version(scientist: Actor, artifacts_dir: Any) -> DatasetVersion:
    return DatasetVersion.objects.get(pk=make_training_version(scientist, name="intents"))


@pytest.fixture
def other_version(scientist: Actor, artifacts_dir: Any) -> DatasetVersion:
    pk = make_training_version(scientist, name="private", content=banking_slice(labels=3))
    return DatasetVersion.objects.get(pk=pk)


def ask(actor: Actor, dataset_version: DatasetVersion, **extra: Any) -> Any:
    body = {"dataset": dataset_version.dataset_id, "purpose": "train a router", **extra}
    return actor.api("post", f"{BASE}/data-access/", body)


def granted(scientist: Actor, reviewer: Actor, version: DatasetVersion, **grant: Any) -> str:
    asked = ask(scientist, version)
    assert asked.status_code == 201, asked.content
    decided = reviewer.api("post", f"{BASE}/data-access/{asked.json()['id']}/grant", grant)
    assert decided.status_code == 200, decided.content
    return str(asked.json()["id"])


def snapshot() -> tuple[int, int]:
    return NotebookServer.objects.count(), ApiToken.objects.count()


# --- requests and decisions -------------------------------------------------------------


def test_a_reviewer_grants_a_scientists_request_and_it_is_audited(
    scientist: Actor, reviewer: Actor, version: DatasetVersion
) -> None:
    asked = ask(scientist, version)
    assert asked.status_code == 201
    assert asked.json()["status"] == "requested" and asked.json()["dataset_version"] is None
    request_id = asked.json()["id"]
    decided = reviewer.api("post", f"{BASE}/data-access/{request_id}/grant", {"comment": "fine"})
    assert decided.status_code == 200
    assert decided.json()["status"] == "granted" and decided.json()["decided_by"] == "rita"
    verbs = list(
        AuditEvent.objects.filter(object_id=request_id)
        .order_by("created_at")
        .values_list("verb", flat=True)
    )
    assert verbs == ["data_access.request", "data_access.grant"]
    # A second request for what is granted already is refused.
    assert ask(scientist, version).status_code == 409


def test_nobody_decides_their_own_request(reviewer: Actor, version: DatasetVersion) -> None:
    asked = ask(reviewer, version)
    refused = reviewer.api("post", f"{BASE}/data-access/{asked.json()['id']}/grant", {})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "own_request"
    assert DataAccessRequest.objects.get(pk=asked.json()["id"]).status == "requested"


def test_roles_requests_need_a_scientist_decisions_a_reviewer(
    scientist: Actor, viewer: Actor, admin: Actor, version: DatasetVersion
) -> None:
    assert ask(viewer, version).status_code == 403
    asked = ask(scientist, version).json()["id"]
    assert scientist.api("post", f"{BASE}/data-access/{asked}/grant", {}).status_code == 403
    denied = admin.api("post", f"{BASE}/data-access/{asked}/deny", {"comment": "no"})
    assert denied.status_code == 200 and denied.json()["status"] == "denied"
    again = admin.api("post", f"{BASE}/data-access/{asked}/grant", {})
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"
    # A scientist sees their own requests; a viewer none of theirs.
    assert [r["id"] for r in scientist.api("get", f"{BASE}/data-access/").json()["results"]] == [
        asked
    ]
    assert viewer.api("get", f"{BASE}/data-access/").json()["count"] == 0


def test_bad_requests_are_400_naming_the_field(
    scientist: Actor, outsider: Actor, version: DatasetVersion
) -> None:
    foreign = outsider.api(
        "post", "/api/v1/tenants/globex/data-access/",
        {"dataset": version.dataset_id, "purpose": "peek at acme"},
    )  # fmt: skip
    assert foreign.status_code == 400 and "dataset" in foreign.json()["error"]["fields"]
    no_version = ask(scientist, version, version="9")
    assert no_version.status_code == 400 and "version" in no_version.json()["error"]["fields"]
    short = scientist.api(
        "post", f"{BASE}/data-access/", {"dataset": version.dataset_id, "purpose": "x"}
    )
    assert short.status_code == 400 and "purpose" in short.json()["error"]["fields"]
    assert DataAccessRequest.objects.count() == 0


# --- granted data -----------------------------------------------------------------------


def test_granted_data_lists_and_downloads_only_what_was_granted(
    scientist: Actor, reviewer: Actor, version: DatasetVersion, other_version: DatasetVersion
) -> None:
    assert scientist.api("get", f"{BASE}/granted-data/").json()["count"] == 0
    granted(scientist, reviewer, version)
    listed = scientist.api("get", f"{BASE}/granted-data/").json()["results"]
    assert [v["id"] for v in listed] == [version.pk]
    ok = scientist.client.get(f"{BASE}/granted-data/{version.pk}/download")
    assert ok.status_code == 200 and ok["X-Content-SHA256"] == version.sha256
    refused = scientist.client.get(f"{BASE}/granted-data/{other_version.pk}/download")
    assert refused.status_code == 403
    assert "no access grant" in refused.json()["error"]["message"]
    assert "private" in refused.json()["error"]["message"]
    # Granted to sam, not to the reviewer who granted it.
    assert reviewer.client.get(f"{BASE}/granted-data/{version.pk}/download").status_code == 403


def test_a_whole_dataset_grant_covers_later_versions_until_revoked(
    scientist: Actor, reviewer: Actor, version: DatasetVersion, upload: Any
) -> None:
    request_id = granted(scientist, reviewer, version)
    newer = upload(scientist, version.dataset_id, "v2.csv", banking_slice(offset=30))
    assert newer.status_code == 201
    ids = {v["id"] for v in scientist.api("get", f"{BASE}/granted-data/").json()["results"]}
    assert ids == {version.pk, newer.json()["id"]}
    revoked = reviewer.api("post", f"{BASE}/data-access/{request_id}/revoke", {})
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert scientist.api("get", f"{BASE}/granted-data/").json()["count"] == 0


def test_an_expired_grant_grants_nothing(
    scientist: Actor, reviewer: Actor, version: DatasetVersion
) -> None:
    soon = timezone.now() + timedelta(hours=1)
    request_id = granted(scientist, reviewer, version, expires_at=soon.isoformat())
    assert scientist.api("get", f"{BASE}/granted-data/").json()["count"] == 1
    DataAccessRequest.objects.filter(pk=request_id).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert scientist.api("get", f"{BASE}/granted-data/").json()["count"] == 0
    past = reviewer.api(
        "post",
        f"{BASE}/data-access/{ask(scientist, version).json()['id']}/grant",
        {"expires_at": (timezone.now() - timedelta(days=1)).isoformat()},
    )
    assert past.status_code == 400


# --- a notebook's token -----------------------------------------------------------------


def notebook_token(actor: Actor) -> Any:
    from django.test import Client

    issued = token_create(
        user=actor.user,
        name=f"{services.NOTEBOOK_TOKEN_PREFIX}nb_test",
        tenant=actor.user.memberships.get().tenant,
    )
    return Client(HTTP_AUTHORIZATION=f"Bearer {issued.secret}")


def test_a_notebook_token_reaches_granted_data_runs_and_models_only(
    scientist: Actor, reviewer: Actor, version: DatasetVersion, other_version: DatasetVersion
) -> None:
    granted(scientist, reviewer, version)
    client = notebook_token(scientist)
    assert client.get(f"{BASE}/granted-data/").status_code == 200
    assert client.get(f"{BASE}/runs/").status_code == 200
    assert client.get(f"{BASE}/models/").status_code == 200
    for path in (
        f"{BASE}/datasets/",
        f"{BASE}/datasets/{other_version.dataset_id}/versions/1/download",
        f"{BASE}/audit/",
        f"{BASE}/notebooks/",
        "/api/v1/tokens/",
    ):
        refused = client.get(path)
        assert refused.status_code == 403, path
        assert "notebook" in refused.json()["error"]["message"]
    run = {"dataset_version": other_version.pk, "base_model": "tiny-bert", "params": {}}
    refused_run = client.post(f"{BASE}/runs/", run, content_type="application/json")
    assert refused_run.status_code == 403
    assert other_version.pk in refused_run.json()["error"]["message"]
    run["dataset_version"] = version.pk
    allowed = client.post(f"{BASE}/runs/", run, content_type="application/json")
    assert allowed.status_code == 202, allowed.content
    # Results go to training data; golden sets (which decide promotions) are refused.
    golden = reviewer.api("post", f"{BASE}/datasets/", {"name": "gold", "kind": "golden"})
    upload_path = f"{BASE}/datasets/{golden.json()['id']}/versions/"
    refused_upload = client.post(upload_path, {})
    assert refused_upload.status_code == 403
    assert "training datasets only" in refused_upload.json()["error"]["message"]
    # The same user's personal token is not limited.
    assert scientist.api("get", f"{BASE}/datasets/").status_code == 200


# --- starting a notebook: refusals leave nothing behind ---------------------------------


def test_an_ungranted_or_foreign_version_is_refused_before_anything_is_made(
    scientist: Actor, outsider: Actor, version: DatasetVersion, settings: Any
) -> None:
    settings.JUPYTERHUB_API_TOKEN = "unused"
    before = snapshot()
    ungranted = scientist.api("post", f"{BASE}/notebooks/", {"datasets": [version.pk]})
    assert ungranted.status_code == 400
    assert "no access grant" in ungranted.json()["error"]["fields"]["datasets"][0]
    foreign = outsider.api("post", "/api/v1/tenants/globex/notebooks/", {"datasets": [version.pk]})
    assert foreign.status_code == 400
    assert "no such dataset version" in str(foreign.json()["error"]["fields"]["datasets"])
    assert snapshot() == before


@pytest.mark.parametrize("hub", ["down", "not_configured"])
def test_a_hub_that_does_not_answer_is_503_and_leaves_no_token_or_row(
    hub: str, scientist: Actor, reviewer: Actor, version: DatasetVersion, settings: Any
) -> None:
    granted(scientist, reviewer, version)
    settings.JUPYTERHUB_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens
    settings.JUPYTERHUB_API_TOKEN = "a-token" if hub == "down" else ""
    before = snapshot()
    response = scientist.api("post", f"{BASE}/notebooks/", {"datasets": [version.pk]})
    assert response.status_code == 503, response.content
    expected = "hub_unavailable" if hub == "down" else "hub_not_configured"
    assert response.json()["error"]["code"] == expected
    assert snapshot() == before
    assert not AuditEvent.objects.filter(verb="notebook.start").exists()  # rolled back too
    # Listing still answers, with what is known.
    assert scientist.api("get", f"{BASE}/notebooks/").status_code == 200


def test_a_server_over_the_per_user_limit_is_409(
    scientist: Actor, settings: Any, tenant: Any
) -> None:
    settings.NOTEBOOK_MAX_SERVERS_PER_USER = 1
    settings.JUPYTERHUB_API_TOKEN = "unused"
    NotebookServer.objects.create(
        tenant=tenant, user=scientist.user, hub_user="sam", server_name="nb-a",
        status=NotebookStatus.RUNNING,
    )  # fmt: skip
    before = snapshot()
    response = scientist.api("post", f"{BASE}/notebooks/", {})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "limit_reached"
    assert "stop one first" in response.json()["error"]["message"]
    assert snapshot() == before


def test_viewers_get_no_notebooks_and_other_users_servers_are_404(
    viewer: Actor, scientist: Actor, reviewer: Actor, tenant: Any
) -> None:
    assert viewer.api("post", f"{BASE}/notebooks/", {}).status_code == 403
    theirs = NotebookServer.objects.create(
        tenant=tenant, user=reviewer.user, hub_user="rita", server_name="nb-b"
    )
    assert scientist.api("get", f"{BASE}/notebooks/{theirs.pk}/").status_code == 404
    assert scientist.api("delete", f"{BASE}/notebooks/{theirs.pk}/").status_code == 404
    assert NotebookServer.objects.get(pk=theirs.pk).status == "starting"


def test_a_hub_down_at_sync_changes_nothing(scientist: Actor, settings: Any, tenant: Any) -> None:
    settings.JUPYTERHUB_URL = f"http://127.0.0.1:{free_port()}"
    settings.JUPYTERHUB_API_TOKEN = "a-token"
    server = NotebookServer.objects.create(
        tenant=tenant, user=scientist.user, hub_user="sam", server_name="nb-c",
        status=NotebookStatus.RUNNING,
    )  # fmt: skip
    assert services.notebooks_sync() == 0
    server.refresh_from_db()
    assert server.status == "running"
    stop = scientist.api("delete", f"{BASE}/notebooks/{server.pk}/")
    assert stop.status_code == 503
    server.refresh_from_db()
    assert server.status == "running"  # not marked stopped while it may still run
