"""Batch predictions on a real Celery worker (issue 17): banking77's 10,000 training rows
scored by a tiny tenant model, the worker SIGKILLed half way and the job resumed by another
at its first chunk not recorded — every row once in the output, as an uninterrupted run
would have written it; and a running job cancelled between chunks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from apps.batch.models import BatchPrediction
from apps.tenants.models import Role
from tests.conftest import BANKING77, make_actor
from tests.deploy_helpers import register
from tests.training_helpers import make_training_version, wait_for
from tests.worker.serving.models import PackedModel, pack, train_tiny

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]
API = "/api/v1/tenants/acme/batch-predictions/"


@pytest.fixture
def backlog(celery_worker_process: Any, tenant: Any, settings: Any, tmp_path: Any) -> Any:
    """acme's tiny model in the worker's artifact store and banking77 train as a dataset."""
    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    settings.BATCH_CHUNK_ROWS = 250
    owner = make_actor("olga", tenant, Role.ADMIN)
    model: PackedModel = pack(train_tiny(tmp_path / "train", seed=11), tmp_path / "model.tar")
    version = register(owner, tenant, "intents", model)
    content = (BANKING77 / "train.csv").read_bytes().replace(b"text,category", b"text,label", 1)
    data = make_training_version(owner, name="backlog", content=content)
    return owner, version, data, model


def _output(owner: Any, job_id: str) -> list[dict[str, Any]]:
    response = owner.api("get", f"{API}{job_id}/output")
    assert response.status_code == 200
    return [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]


def test_a_worker_killed_half_way_loses_no_row_and_scores_none_twice(
    backlog: Any, celery_worker_process: Any
) -> None:
    from tests.conftest import start_worker, stop_worker

    owner, version, data, model = backlog
    body = {"model_version": version.pk, "dataset_version": data, "text_column": "text"}
    job_id = owner.api("post", API, body).json()["id"]
    job = BatchPrediction.objects.filter(pk=job_id)
    wait_for(lambda: job.filter(status="running", chunks_done__gte=8).exists(), timeout=240)
    original = dict(celery_worker_process.start_kwargs or {})
    stop_worker(celery_worker_process, kill=True)
    killed_at = job.get().chunks_done
    assert 8 <= killed_at < 40, killed_at  # 40 chunks of 250 rows in all
    rescuer = start_worker(**original, name="batch-rescuer", beat=True)
    try:
        done = wait_for(lambda: job.filter(status="succeeded").first(), timeout=300, every=0.5)
        assert done.attempt == 2 and done.rows_done == done.rows_total == 10003
        rows = _output(owner, job_id)
        assert [r["row"] for r in rows] == list(range(10003))  # each once, in order
        # As an uninterrupted run writes them: the serving code's answers for every row.
        from worker.batch import read_texts
        from worker.serving.loading import build_classifier

        texts = read_texts(BANKING77 / "train.csv", "csv", "text")
        served = build_classifier(model.tar.read_bytes(), device="cpu")
        want = served.predict(texts)  # type: ignore[union-attr]
        assert [r["label"] for r in rows] == [w["label"] for w in want]
        assert sum(done.label_counts.values()) == 10003
        events = owner.api("get", f"/api/v1/tenants/acme/audit/?object_id={job_id}").json()
        verbs = [e["verb"] for e in events["results"]]
        assert "batch_prediction.requeue" in verbs and "batch_prediction.succeeded" in verbs
    finally:
        stop_worker(rescuer)
        fresh = start_worker(**original, name="worker-after-batch-rescue")
        celery_worker_process.process = fresh.process
        celery_worker_process.log_path = fresh.log_path
        celery_worker_process.node = fresh.node


def test_a_running_job_cancelled_stops_between_chunks_with_no_output(backlog: Any) -> None:
    owner, version, data, _ = backlog
    job_id = owner.api("post", API, {"model_version": version.pk, "dataset_version": data}).json()[
        "id"
    ]
    job = BatchPrediction.objects.filter(pk=job_id)
    wait_for(lambda: job.filter(status="running", chunks_done__gte=2).exists(), timeout=240)
    asked = owner.api("post", f"{API}{job_id}/cancel")
    assert asked.status_code == 200 and asked.json()["cancel_requested"] is True
    cancelled = wait_for(lambda: job.filter(status="cancelled").first(), timeout=60)
    assert 2 <= cancelled.chunks_done < 40 and cancelled.rows_done < 10003
    assert (
        cancelled.output_key == "" and owner.api("get", f"{API}{job_id}/output").status_code == 409
    )
