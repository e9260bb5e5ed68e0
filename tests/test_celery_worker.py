"""A real Celery worker process, consuming from the configured broker (Redis in CI)."""

from __future__ import annotations

import time

import pytest

from apps.datasets.models import Dataset
from tests.conftest import stored_files

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]
GOOD_CSV = b"text,label\nwhere is my card,card_arrival\nI lost my card,lost_card\n"


def wait_for(condition, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_deleting_a_dataset_removes_its_bytes_on_a_worker_with_the_request_id(
    celery_worker_process, scientist, training_dataset, settings, client
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    root = celery_worker_process.artifacts_root
    settings.ARTIFACT_STORE = f"file://{root}"
    # The worker's store is the session's: earlier tests' bytes may be there already.
    before = set(stored_files(root))
    response = scientist.client.post(
        f"/api/v1/tenants/acme/datasets/{training_dataset}/versions/",
        {"file": SimpleUploadedFile("a.csv", GOOD_CSV)},
    )
    assert response.status_code == 201
    mine = set(stored_files(root)) - before
    assert len(mine) == 1

    response = scientist.client.delete(
        f"/api/v1/tenants/acme/datasets/{training_dataset}/", HTTP_X_REQUEST_ID="req-delete-42"
    )
    assert response.status_code == 204
    assert not Dataset.objects.filter(pk=training_dataset).exists()
    assert wait_for(lambda: not mine & set(stored_files(root))), celery_worker_process.log()

    # The worker's log lines for that task carry the web request's id (the "task finished"
    # line is written after the bytes are gone, so it is waited for too).
    def finished_lines() -> list[str]:
        return [
            line
            for line in celery_worker_process.log().splitlines()
            if "datasets.delete_artifacts" in line and "task finished" in line
        ]

    assert wait_for(finished_lines), celery_worker_process.log()[-4000:]
    assert all("req-delete-42" in line for line in finished_lines()), finished_lines()

    # ... and /metrics counts the task, recorded by the worker process.
    def counted() -> bool:
        body = client.get("/metrics").content.decode()
        return 'workbench_tasks_total{outcome="success",task="datasets.delete_artifacts"}' in body

    assert wait_for(counted), client.get("/metrics").content.decode()[-2000:]
