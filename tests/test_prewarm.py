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


@pytest.mark.django_db
def test_the_prewarm_request_goes_through_drf_and_stays_out_of_metrics_and_the_log(caplog):
    application = get_wsgi_application()
    before = _count("401")
    with caplog.at_level(logging.INFO, logger="workbench.http"):
        status = dataplane._request(application, "POST", PATH)
    # Unauthenticated, so it changes nothing: DRF answers it 401 in the error envelope.
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
