"""Operations endpoints (/healthz, /readyz, /metrics) and the request id on every request."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from apps.audit.models import AuditEvent
from apps.core import artifacts
from tests.conftest import Actor

GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")
DATASETS_ROUTE = "api/v1/tenants/<slug:tenant>/datasets/"


@pytest.fixture
def fresh_store_cache() -> Iterator[None]:
    """Artifact stores are cached per URL; tests that change ARTIFACT_STORE start clean."""
    artifacts._cached.cache_clear()
    yield
    artifacts._cached.cache_clear()


def closed_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket closes


# --- liveness and readiness ---------------------------------------------------------------


def test_healthz_answers_ok_without_touching_anything(client: Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_healthz_accepts_only_get(client: Client) -> None:
    assert client.post("/healthz").status_code == 405


@pytest.mark.django_db
def test_readyz_reports_every_dependency_ok(
    client: Client, artifacts_dir: Path, fresh_store_cache: None
) -> None:
    # The broker is whatever CELERY_BROKER_URL configures (Redis in CI, the local one here).
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "broker": "ok", "artifact_store": "ok"},
    }


@pytest.mark.django_db
def test_readyz_is_503_naming_an_unreachable_s3_artifact_store(
    client: Client,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fresh_store_cache: None,
) -> None:
    # A real S3 client against a loopback port where nothing listens: refused at once,
    # and one attempt only, so the check fails fast instead of retrying.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    settings.ARTIFACT_STORE = "s3://workbench/artifacts"
    settings.AWS_ENDPOINT_URL = f"http://127.0.0.1:{closed_loopback_port()}"

    response = client.get("/readyz")

    assert response.status_code == 503, response.content
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"] == "ok"
    assert body["checks"]["artifact_store"].startswith("error: EndpointConnectionError")


@pytest.mark.django_db
def test_readyz_is_503_when_the_artifact_store_ping_fails(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BrokenStore:
        url = "file:///nowhere"

        def ping(self) -> None:
            raise OSError("artifact root /nowhere is not writable")

    monkeypatch.setattr("apps.core.views.get_store", lambda: BrokenStore())
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {
        "database": "ok",
        "broker": "ok",
        "artifact_store": "error: OSError: artifact root /nowhere is not writable",
    }


@pytest.mark.django_db
def test_readyz_is_503_naming_an_unreachable_broker(
    client: Client,
    artifacts_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_store_cache: None,
) -> None:
    from workbench.celery import app

    closed = f"redis://127.0.0.1:{closed_loopback_port()}/0"
    monkeypatch.setattr(app.conf, "broker_url", closed)
    # Celery lets the CELERY_BROKER_URL environment variable (set in CI) win over its conf.
    monkeypatch.setenv("CELERY_BROKER_URL", closed)
    response = client.get("/readyz")
    assert response.status_code == 503, response.content
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["artifact_store"] == "ok"
    assert checks["broker"].startswith("error: ")


def test_ops_endpoints_are_exempt_from_the_https_redirect(settings: Any, db: Any) -> None:
    # Load balancers and Prometheus probe over plain http inside the network.
    settings.SECURE_SSL_REDIRECT = True
    client = Client()  # a new handler, so SecurityMiddleware reads the changed setting
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/readyz").status_code in {200, 503}
    redirected = client.get("/api/v1/tenants/")
    assert redirected.status_code == 301
    assert redirected["Location"].startswith("https://")


# --- metrics ------------------------------------------------------------------------------


def request_samples(client: Client) -> list[Any]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    families = text_string_to_metric_families(response.content.decode())
    return [
        sample
        for family in families
        if family.name == "workbench_http_request_duration_seconds"
        for sample in family.samples
    ]


def request_counts(client: Client) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for s in request_samples(client)
        if s.name.endswith("_count")
    }


def test_metrics_label_api_requests_by_route_pattern(scientist: Actor, client: Client) -> None:
    # Differences, not totals: the multiprocess directory keeps samples of earlier processes.
    before = request_counts(client)
    created = scientist.api(
        "post", "/api/v1/tenants/acme/datasets/", {"name": "m", "kind": "training"}
    )
    assert created.status_code == 201
    dataset_id = created.json()["id"]
    assert scientist.api("get", "/api/v1/tenants/acme/datasets/").status_code == 200
    assert scientist.api("get", f"/api/v1/tenants/acme/datasets/{dataset_id}/").status_code == 200
    after = request_counts(client)

    def grew(route: str, method: str, status: str) -> float:
        key = (route, method, status)
        return after.get(key, 0) - before.get(key, 0)

    assert grew(DATASETS_ROUTE, "POST", "201") >= 1
    assert grew(DATASETS_ROUTE, "GET", "200") >= 1
    assert grew(f"{DATASETS_ROUTE}<str:dataset_id>/", "GET", "200") >= 1
    # Never raw paths: a tenant slug or an object id in a label would explode cardinality.
    routes = {route for route, _, _ in after}
    assert not any("acme" in route or dataset_id in route for route in routes), routes


def test_metrics_count_requests_that_match_no_route(client: Client) -> None:
    before = request_counts(client).get(("<unmatched>", "GET", "404"), 0)
    assert client.get("/no/such/page/12345").status_code == 404
    after = request_counts(client)
    assert after.get(("<unmatched>", "GET", "404"), 0) - before >= 1
    assert not any("12345" in route for route, _, _ in after)


# --- request id -----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/api/v1/tenants/", "/nope"])
def test_every_response_carries_a_request_id(client: Client, path: str) -> None:
    response = client.get(path)
    assert GENERATED_ID.match(response["X-Request-ID"]), response["X-Request-ID"]


def test_each_request_gets_its_own_generated_id(client: Client) -> None:
    ids = {client.get("/healthz")["X-Request-ID"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize("incoming", ["req-abc-123", "a" * 64, "Trace.ID_42", "0"])
def test_valid_incoming_request_id_is_echoed(client: Client, incoming: str) -> None:
    assert client.get("/healthz", HTTP_X_REQUEST_ID=incoming)["X-Request-ID"] == incoming


@pytest.mark.parametrize(
    "incoming",
    ["a" * 200, "a" * 65, "has spaces", "new\tline", "semi;colon", "slash/es", "ü-nicode", ""],
    ids=["200-chars", "65-chars", "spaces", "tab", "semicolon", "slash", "non-ascii", "empty"],
)
def test_invalid_incoming_request_id_is_replaced(client: Client, incoming: str) -> None:
    echoed = client.get("/healthz", HTTP_X_REQUEST_ID=incoming)["X-Request-ID"]
    assert echoed != incoming
    assert GENERATED_ID.match(echoed)


def test_audit_events_of_an_api_request_carry_its_request_id(scientist: Actor) -> None:
    before = set(AuditEvent.objects.values_list("pk", flat=True))
    response = scientist.api(
        "post",
        "/api/v1/tenants/acme/datasets/",
        {"name": "traced", "kind": "training"},
        HTTP_X_REQUEST_ID="req-abc-123",
    )
    assert response.status_code == 201, response.content
    assert response["X-Request-ID"] == "req-abc-123"

    created = AuditEvent.objects.exclude(pk__in=before)
    assert [(e.verb, e.request_id) for e in created] == [("dataset.create", "req-abc-123")]
    assert created.get().object_id == response.json()["id"]


def test_audit_events_carry_the_generated_id_when_the_caller_sends_none_or_a_bad_one(
    scientist: Actor,
) -> None:
    response = scientist.api(
        "post",
        "/api/v1/tenants/acme/datasets/",
        {"name": "untraced", "kind": "training"},
        HTTP_X_REQUEST_ID="bad id",
    )
    assert response.status_code == 201, response.content
    event = AuditEvent.objects.get(verb="dataset.create", object_id=response.json()["id"])
    assert event.request_id == response["X-Request-ID"]
    assert GENERATED_ID.match(event.request_id)


def test_audit_events_outside_a_request_have_no_request_id(scientist: Actor) -> None:
    # The fixtures create the tenant, membership and token by direct service calls.
    events = {e.verb: e.request_id for e in AuditEvent.objects.all()}
    assert {"tenant.create", "member.add", "token.create"} <= set(events)
    assert set(events.values()) == {""}


def test_request_id_does_not_leak_into_the_next_request(scientist: Actor) -> None:
    scientist.api(
        "post",
        "/api/v1/tenants/acme/datasets/",
        {"name": "first", "kind": "training"},
        HTTP_X_REQUEST_ID="req-first",
    )
    second = scientist.api(
        "post", "/api/v1/tenants/acme/datasets/", {"name": "second", "kind": "training"}
    )
    event = AuditEvent.objects.get(verb="dataset.create", object_id=second.json()["id"])
    assert event.request_id == second["X-Request-ID"] != "req-first"
