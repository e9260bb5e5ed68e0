"""A fresh web process warms its request path before its first request (``wsgi.py``,
``apps.deployments.dataplane.prewarm``) without that start-up request showing anywhere."""

from __future__ import annotations

import logging

import pytest
from django.core.wsgi import get_wsgi_application
from django.urls import resolve

from apps.core.metrics import HTTP_REQUEST_SECONDS
from apps.deployments import dataplane

PATH = "/api/v1/tenants/-/models/-/predict"


def _count(status: str) -> float:
    sample = HTTP_REQUEST_SECONDS.labels(resolve(PATH).route, "POST", status)
    return sum(s.value for s in sample.collect()[0].samples if s.name.endswith("_count"))


@pytest.mark.django_db(transaction=True)  # the request's own connection handling
def test_the_prewarm_request_goes_through_drf_and_stays_out_of_metrics_and_the_log(caplog):
    application = get_wsgi_application()
    before = _count("401")
    with caplog.at_level(logging.INFO, logger="workbench.http"):
        status = dataplane._request(application, "POST", PATH)
    # Its token matches none, so it changes nothing: DRF answers it 401 in the envelope.
    assert status.startswith("401")
    assert _count("401") == before
    assert not [r for r in caplog.records if r.getMessage() == "request"]


@pytest.mark.django_db
def test_a_client_request_is_counted_and_logged(client, caplog):
    """The same request from a client, for contrast: a header cannot hide a request."""
    before = _count("401")
    with caplog.at_level(logging.INFO, logger="workbench.http"):
        response = client.post(
            PATH,
            {"inputs": ["x"]},
            content_type="application/json",
            HTTP_WORKBENCH_PREWARM="1",
        )
    assert response.status_code == 401
    assert _count("401") == before + 1
    assert [r for r in caplog.records if r.getMessage() == "request"]


@pytest.mark.django_db(transaction=True)
def test_a_gunicorn_worker_prewarms_the_predict_reads_and_keeps_its_connection():
    """In a gunicorn worker (post_worker_init) the prewarm runs the queries a predict
    makes — the token lookup through the stack, the membership, the model and its
    deployments — for ids no row has, changes nothing, and keeps the connection it
    prepared them on; elsewhere the connection is closed for a server that forks."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from apps.audit.models import AuditEvent
    from apps.tenants.models import ApiToken

    application = get_wsgi_application()
    tokens, events = ApiToken.objects.count(), AuditEvent.objects.count()
    with CaptureQueriesContext(connection) as seen:
        dataplane.prewarm(application, keep_connection=True)
    tables = " ".join(q["sql"] for q in seen.captured_queries)
    for table in ("tenants_apitoken", "tenants_membership", "registry_registeredmodel",
                  "deployments_deployment"):  # fmt: skip
        assert table in tables
    assert connection.connection is not None  # still open
    assert (ApiToken.objects.count(), AuditEvent.objects.count()) == (tokens, events)
    dataplane.prewarm(application)
    assert connection.connection is None
