"""The notebooks and data-access pages (Django test client; starting on a real hub and
single sign-on are in tests/browser/test_notebooks_browser.py)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from apps.datasets.models import DatasetVersion
from apps.notebooks.models import DataAccessRequest, NotebookServer
from apps.tenants.models import ApiToken
from tests.conftest import Actor, free_port
from tests.training_helpers import make_training_version

pytestmark = pytest.mark.django_db


def page_client(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


@pytest.fixture
def dataset_id(scientist: Actor, artifacts_dir: Any) -> str:
    version = DatasetVersion.objects.get(pk=make_training_version(scientist, name="intents"))
    return str(version.dataset_id)


def test_request_access_on_the_page_then_a_reviewer_grants_it(
    scientist: Actor, reviewer: Actor, dataset_id: str
) -> None:
    sam, rita = page_client(scientist), page_client(reviewer)
    page = sam.get("/t/acme/data-access/")
    assert page.status_code == 200 and b"access-request-form" in page.content
    bad = sam.post("/t/acme/data-access/", {"dataset": dataset_id, "version": "7", "purpose": "x"})
    assert bad.status_code == 400 and b"has no version 7" in bad.content
    asked = sam.post(
        "/t/acme/data-access/", {"dataset": dataset_id, "purpose": "route support tickets"}
    )
    assert asked.status_code == 302
    request = DataAccessRequest.objects.get()
    # The requester sees it without buttons; a reviewer gets grant and deny.
    assert b"access-decide-form" not in sam.get("/t/acme/data-access/").content
    assert b"access-decide-form" in rita.get("/t/acme/data-access/").content
    refused = sam.post(f"/t/acme/data-access/{request.pk}/decide/", {"decision": "grant"})
    assert refused.status_code == 403
    granted = rita.post(
        f"/t/acme/data-access/{request.pk}/decide/",
        {"decision": "grant", "comment": "ok", "days": "30"},
        follow=True,
    )
    assert b"grant recorded" in granted.content
    request.refresh_from_db()
    assert request.status == "granted" and request.expires_at is not None
    # The grant shows on the notebooks page as data to attach.
    notebooks = sam.get("/t/acme/notebooks/")
    assert b"intents v1" in notebooks.content and b"notebook-no-grants" not in notebooks.content


def test_starting_with_the_hub_down_says_so_and_makes_nothing(
    scientist: Actor, settings: Any
) -> None:
    settings.JUPYTERHUB_URL = f"http://127.0.0.1:{free_port()}"
    settings.JUPYTERHUB_API_TOKEN = "a-token"
    tokens = ApiToken.objects.count()
    response = page_client(scientist).post("/t/acme/notebooks/", {}, follow=True)
    assert response.status_code == 503
    assert b"JupyterHub does not answer" in response.content
    assert NotebookServer.objects.count() == 0 and ApiToken.objects.count() == tokens


def test_viewers_see_the_page_without_a_start_button(viewer: Actor) -> None:
    page = page_client(viewer).get("/t/acme/notebooks/")
    assert page.status_code == 200
    assert b"notebook-start-form" not in page.content
    assert page_client(viewer).post("/t/acme/notebooks/", {}).status_code == 403


def test_another_tenants_page_is_404(outsider: Actor) -> None:
    assert page_client(outsider).get("/t/acme/notebooks/").status_code == 404
    assert page_client(outsider).get("/t/acme/data-access/").status_code == 404
