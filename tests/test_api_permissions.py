"""Every API view keeps the default permission classes and the per-token throttle.

A view that sets ``permission_classes`` of its own drops the defaults, and with them the
limits on notebook tokens (``NotebookTokenLimits``): a notebook's token could then list and
revoke its user's tokens, or a staff member's notebook token write shared golden sets.
Views are enumerated from the URL conf, so one added later is checked too.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.cache import cache
from django.test import Client
from rest_framework.permissions import AllowAny
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from apps.core.throttling import TokenRateThrottle
from apps.datasets.models import Dataset
from apps.notebooks.services import NOTEBOOK_TOKEN_PREFIX
from apps.tenants.models import ApiToken
from apps.tenants.services import token_create
from tests.conftest import Actor
from tests.routes import url_routes

pytestmark = pytest.mark.django_db

# The schema and its Swagger UI are public documentation: they hold no tenant data
# (test_isolation reads them for ids) and a fuzzer or a new user reads them signed out.
PUBLIC_DOCS = {"api/v1/schema/", "api/v1/docs/"}


def drf_views() -> list[tuple[str, type[APIView]]]:
    views = []
    for route, callback in url_routes():
        view_class = getattr(callback, "cls", None)  # set by APIView.as_view()
        if isinstance(view_class, type) and issubclass(view_class, APIView):
            views.append((route, view_class))
    return views


def notebook_client(user: Any, tenant: Any = None) -> tuple[Client, ApiToken]:
    """A client holding a notebook server's token, as ``notebook_start`` issues one."""
    issued = token_create(user=user, name=f"{NOTEBOOK_TOKEN_PREFIX}nb_probe", tenant=tenant)
    return Client(HTTP_AUTHORIZATION=f"Bearer {issued.secret}"), issued.token


def test_every_api_view_keeps_the_default_permissions_and_the_token_throttle() -> None:
    defaults = list(api_settings.DEFAULT_PERMISSION_CLASSES)
    assert len(defaults) == 2  # IsAuthenticated, NotebookTokenLimits
    api_routes = [route for route, _ in url_routes("api/v1/")]
    views = drf_views()
    drf_routes = {route for route, _ in views}
    # A plain Django view under the API would skip authentication, permissions, throttles.
    assert [r for r in api_routes if r not in drf_routes] == []
    assert len(views) >= 40
    dropped, unthrottled = [], []
    for route, view_class in views:
        if route in PUBLIC_DOCS:
            assert list(view_class.permission_classes) == [AllowAny], route
            continue
        if list(view_class.permission_classes)[: len(defaults)] != defaults:
            dropped.append(route)
        # Permissions decided per request, outside permission_classes, would escape this.
        if view_class.get_permissions is not APIView.get_permissions:
            dropped.append(f"{route} (overrides get_permissions)")
        if TokenRateThrottle not in view_class.throttle_classes:
            unthrottled.append(route)
    assert dropped == []
    assert unthrottled == []


def test_a_notebook_token_cannot_list_read_or_revoke_its_users_tokens(scientist: Actor) -> None:
    personal = ApiToken.objects.get(user=scientist.user, name="sam-test")
    client, _ = notebook_client(scientist.user, scientist.user.memberships.get().tenant)
    for method, path in (
        ("get", "/api/v1/tokens/"),
        ("post", "/api/v1/tokens/"),
        ("get", f"/api/v1/tokens/{personal.pk}/"),
        ("delete", f"/api/v1/tokens/{personal.pk}/"),
    ):
        refused = getattr(client, method)(path, content_type="application/json")
        assert refused.status_code == 403, (method, path, refused.content)
        assert "notebook" in refused.json()["error"]["message"]
    personal.refresh_from_db()
    assert personal.revoked_at is None
    # The same user's personal token still manages tokens.
    assert scientist.api("get", f"/api/v1/tokens/{personal.pk}/").status_code == 200


def test_a_staff_members_notebook_token_cannot_write_shared_golden_sets(staff: Actor) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    created = staff.api("post", "/api/v1/shared-datasets/", {"name": "gold", "domain": "banking"})
    assert created.status_code == 201, created.content
    shared = created.json()["id"]
    client, _ = notebook_client(staff.user)
    before = Dataset.objects.count()
    for path, body in (
        ("/api/v1/shared-datasets/", {"name": "forged", "domain": "banking"}),
        (f"/api/v1/shared-datasets/{shared}/versions/", None),
    ):
        if body is None:
            csv = b"text,label\nwhere is my card,card_arrival\n"
            refused = client.post(path, {"file": SimpleUploadedFile("g.csv", csv)})
        else:
            refused = client.post(path, body, content_type="application/json")
        assert refused.status_code == 403, (path, refused.content)
        assert "notebook" in refused.json()["error"]["message"]
        assert client.get(path).status_code == 403
    assert Dataset.objects.count() == before
    assert Dataset.objects.get(pk=shared).versions.count() == 0


# --- throttling ---------------------------------------------------------------------------


def test_over_the_rate_a_token_gets_429_with_retry_after_in_the_error_envelope(
    settings: Any, scientist: Actor, admin: Actor
) -> None:
    settings.API_THROTTLE_RATE = "3/minute"
    cache.clear()
    path = "/api/v1/tenants/acme/datasets/"
    for _ in range(3):
        assert scientist.api("get", path).status_code == 200
    throttled = scientist.api("get", path)
    assert throttled.status_code == 429
    assert 0 < int(throttled["Retry-After"]) <= 60
    error = throttled.json()["error"]
    assert error["code"] == "throttled"
    assert "throttled" in error["message"]
    # Writes count too, and nothing is done.
    refused = scientist.api("post", path, {"name": "late", "kind": "training"})
    assert refused.status_code == 429
    assert not Dataset.objects.filter(name="late").exists()
    # Keyed on the token: another user's token, and the same user's other token, go on.
    assert admin.api("get", path).status_code == 200
    second = token_create(user=scientist.user, name="second").secret
    assert Client(HTTP_AUTHORIZATION=f"Bearer {second}").get(path).status_code == 200


def test_the_dashboards_session_is_throttled_per_user(settings: Any, scientist: Actor) -> None:
    settings.API_THROTTLE_RATE = "2/minute"
    cache.clear()
    browser = Client()
    browser.force_login(scientist.user)
    path = "/api/v1/tenants/acme/datasets/"
    assert [browser.get(path).status_code for _ in range(3)] == [200, 200, 429]
    other_tab = Client()
    other_tab.force_login(scientist.user)
    assert other_tab.get(path).status_code == 429  # the same user, another session
