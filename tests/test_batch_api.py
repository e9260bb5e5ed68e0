"""Batch predictions (issue 17): the REST doors, their checks, and the job run in this
process by the worker's own task function (tests/test_batch_e2e.py runs it on a real
Celery worker, killed half way)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from apps.audit.models import AuditEvent
from apps.batch import services
from apps.batch.models import BatchPrediction, BatchStatus
from apps.batch.tasks import execute_batch
from apps.datasets.models import DatasetVersion
from apps.tenants.models import Role, Tenant
from tests.conftest import Actor, make_actor
from tests.deploy_helpers import register
from tests.training_helpers import banking_slice, make_training_version
from tests.worker.serving.models import PackedModel, pack, train_tiny

pytestmark = pytest.mark.django_db
API = "/api/v1/tenants/acme/batch-predictions/"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: Any) -> PackedModel:
    root = tmp_path_factory.mktemp("batch-model")
    return pack(train_tiny(root / "train", seed=5), root / "model.tar")


@pytest.fixture
def setup(artifacts_dir: Path, scientist: Actor, tenant: Tenant, tiny: PackedModel) -> Any:
    version = register(scientist, tenant, "intents", tiny)
    data = make_training_version(scientist, name="backlog", content=banking_slice(per_label=30))
    return version, data


def _run(job_id: str) -> BatchPrediction:
    """What the GPU queue's worker does with the job, here: dispatch, then the task."""
    services.batch_dispatch()
    execute_batch.run(job_id)
    return BatchPrediction.objects.get(pk=job_id)


def _expected(tiny: PackedModel, texts: list[str]) -> list[Any]:
    """The serving code path's answers for these texts (what a replica runs)."""
    from worker.serving.loading import build_classifier

    served = build_classifier(tiny.tar.read_bytes(), device="cpu")
    return served.predict(texts)  # type: ignore[union-attr]


def _texts(scientist: Actor, data: str) -> list[str]:
    from apps.core.artifacts import get_store

    version = DatasetVersion.objects.get(pk=data)
    with get_store().open(version.storage_key) as fh:
        return [row["text"] for row in csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"))]


def test_a_batch_prediction_scores_every_row_as_serving_does_and_downloads_with_its_sha256(
    setup: Any, scientist: Actor, tiny: PackedModel, settings: Any
) -> None:
    settings.BATCH_CHUNK_ROWS = 50
    version, data = setup
    created = scientist.api("post", API, {"model_version": version.pk, "dataset_version": data})
    assert created.status_code == 202, created.content
    body = created.json()
    assert body["status"] == "queued" and body["rows_total"] == 180 and body["top_k"] == 3
    job = _run(body["id"])
    assert job.status == BatchStatus.SUCCEEDED, job.error
    assert (job.rows_done, job.chunks_done, job.attempt) == (180, 4, 1)
    detail = scientist.api("get", f"{API}{job.pk}/").json()
    assert detail["progress"] == 1.0 and detail["rows_per_s"] > 0 and detail["eta_seconds"] is None
    download = scientist.api("get", detail["output_url"])
    assert download.status_code == 200
    content = b"".join(download.streaming_content)
    import hashlib

    assert download["X-Content-SHA256"] == hashlib.sha256(content).hexdigest() == job.output_sha256
    rows = [json.loads(line) for line in content.decode().splitlines()]
    texts = _texts(scientist, data)
    assert [r["row"] for r in rows] == list(range(180)) and [r["text"] for r in rows] == texts
    for row, want in zip(rows, _expected(tiny, texts), strict=True):
        assert row["label"] == want["label"] and row["score"] == pytest.approx(want["score"])
        assert row["top_k"][0] == {"label": row["label"], "score": row["score"]}
        assert len(row["top_k"]) == 3 and row["top_k"][1]["score"] <= row["score"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    assert detail["label_counts"] == counts and len(detail["preview"]) == 20
    # The parts are gone; the output stays.
    from apps.core.artifacts import get_store

    assert not get_store().exists(f"{job.part_prefix}/parts/part-00000")
    assert AuditEvent.objects.filter(verb="batch_prediction.succeeded", object_id=job.pk).exists()


def test_the_output_becomes_a_sample_dataset_version_for_review(
    setup: Any, scientist: Actor, reviewer: Actor, settings: Any
) -> None:
    version, data = setup
    job = scientist.api(
        "post", API, {"model_version": version.pk, "dataset_version": data, "output_format": "csv"}
    ).json()
    early = reviewer.api("post", f"{API}{job['id']}/register", {"dataset_name": "to-label"})
    assert early.status_code == 409 and early.json()["error"]["code"] == "no_output"
    finished = _run(job["id"])
    csv_rows = list(csv.DictReader(io.StringIO(b"".join(
        scientist.api("get", f"{API}{job['id']}/output").streaming_content).decode())))  # fmt: skip
    assert len(csv_rows) == 180 and set(csv_rows[0]) == {"row", "text", "label", "score", "top_k"}
    # Sample sets are yardsticks: scientists do not write them, reviewers do.
    assert (
        scientist.api("post", f"{API}{job['id']}/register", {"dataset_name": "x"}).status_code
        == 403
    )
    made = reviewer.api("post", f"{API}{job['id']}/register", {"dataset_name": "to-label"})
    assert made.status_code == 201, made.content
    sample = DatasetVersion.objects.get(pk=made.json()["registered_version"])
    assert sample.dataset.kind == "sample" and sample.rows == 180
    assert sample.labels == finished.label_counts


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"dataset_version": "dv_nope", "model_version": "mv_x"}, 404, "not_found"),
        ({"dataset_version": "DATA", "model_version": "mv_nope"}, 404, "not_found"),
        ({"dataset_version": "DATA"}, 400, "model_required"),
        ({"dataset_version": "DATA", "model": "nope"}, 400, "unknown_model"),
        ({"dataset_version": "DATA", "model": "intents"}, 400, "no_version_in_environment"),
        ({"dataset_version": "DATA", "model_version": "MV", "text_column": "body"}, 400,
         "unknown_column"),
        ({"dataset_version": "DATA", "model_version": "MV", "top_k": 0}, 400, "min_value"),
        ({"dataset_version": "DATA", "model_version": "MV", "output_format": "xml"}, 400,
         "invalid_choice"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_and_change_nothing(
    setup: Any, scientist: Actor, body: dict[str, Any], status: int, code: str
) -> None:
    version, data = setup
    sent = {k: {"DATA": data, "MV": version.pk}.get(v, v) for k, v in body.items()}
    response = scientist.api("post", API, sent)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    if code == "unknown_column":
        assert "text, label" in response.json()["error"]["message"]
    assert not BatchPrediction.objects.exists()


def test_another_tenants_model_or_data_reads_as_unknown(
    setup: Any, scientist: Actor, other_tenant: Tenant, tiny: PackedModel
) -> None:
    version, data = setup
    stranger = make_actor("sly", other_tenant, Role.ADMIN)
    theirs = make_training_version(stranger, tenant="globex", content=banking_slice())
    mine = scientist.api("post", API, {"model_version": version.pk, "dataset_version": theirs})
    assert mine.status_code == 404
    foreign = stranger.api(
        "post",
        "/api/v1/tenants/globex/batch-predictions/",
        {"model_version": version.pk, "dataset_version": theirs},
    )
    assert foreign.status_code == 404 and "model version" in foreign.json()["error"]["message"]
    job = scientist.api("post", API, {"model_version": version.pk, "dataset_version": data}).json()
    for path in ("", "output"):
        assert stranger.api("get", f"/api/v1/tenants/globex/batch-predictions/{job['id']}/{path}"
                            ).status_code == 404  # fmt: skip
    assert not BatchPrediction.objects.filter(tenant=other_tenant).exists()


def test_cancel_stops_a_queued_job_at_once_and_a_sent_one_before_it_scores(
    setup: Any, scientist: Actor, viewer: Actor
) -> None:
    version, data = setup
    queued = scientist.api("post", API, {"model_version": version.pk, "dataset_version": data})
    job_id = queued.json()["id"]
    assert viewer.api("post", f"{API}{job_id}/cancel").status_code == 403
    assert scientist.api("get", f"{API}{job_id}/output").status_code == 409
    cancelled = scientist.api("post", f"{API}{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    again = scientist.api("post", f"{API}{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_active"
    # Sent to the queue already: cancelled when a worker picks it up, nothing scored.
    sent = scientist.api(
        "post", API, {"model_version": version.pk, "dataset_version": data}
    ).json()["id"]
    services.batch_dispatch()
    assert scientist.api("post", f"{API}{sent}/cancel").json()["cancel_requested"] is True
    assert execute_batch.run(sent) == "skipped"
    job = BatchPrediction.objects.get(pk=sent)
    assert job.status == BatchStatus.CANCELLED and job.rows_done == 0 and not job.output_key


def test_a_tenant_runs_as_many_at_once_as_its_bound_the_rest_wait(
    setup: Any, scientist: Actor, tenant: Tenant, settings: Any
) -> None:
    from apps.training.models import TrainingRun

    Tenant.objects.filter(pk=tenant.pk).update(max_concurrent_runs=2)
    version, data = setup
    ids = [
        scientist.api("post", API, {"model_version": version.pk, "dataset_version": data}).json()[
            "id"
        ]
        for _ in range(3)
    ]
    TrainingRun.objects.filter(tenant=tenant).update(status="succeeded")  # the model's own
    # A training run of the tenant already holds one of its two GPU slots.
    run = TrainingRun.objects.create(
        tenant=tenant, dataset_version_id=data, model_name="m", base_model="tiny-bert",
        params={}, status="running",
    )  # fmt: skip
    assert services.batch_dispatch() == ids[:1]
    assert services.batch_dispatch() == []  # the first and the run are out
    execute_batch.run(ids[0])
    assert services.batch_dispatch() == ids[1:2]
    TrainingRun.objects.filter(pk=run.pk).update(status="succeeded")
    assert services.batch_dispatch() == ids[2:3]
    # The other way round: a queued run waits while the tenant's batch jobs hold its slots.
    waiting = TrainingRun.objects.create(
        tenant=tenant, dataset_version_id=data, model_name="m", base_model="tiny-bert",
        params={}, status="queued",
    )  # fmt: skip
    from apps.training.services import runs_dispatch

    assert runs_dispatch() == []
    execute_batch.run(ids[1])
    assert runs_dispatch() == [waiting.pk]


def test_a_job_listed_filtered_and_paged(setup: Any, scientist: Actor) -> None:
    version, data = setup
    for _ in range(3):
        scientist.api("post", API, {"model_version": version.pk, "dataset_version": data})
    listed = scientist.api("get", f"{API}?status=queued&page_size=2").json()
    assert listed["count"] == 3 and len(listed["results"]) == 2 and listed["next"]
    assert scientist.api("get", f"{API}?status=succeeded").json()["count"] == 0


def test_the_notebook_client_scores_a_dataset_and_reads_the_rows(
    live_server: Any, transactional_db: Any, artifacts_dir: Path, scientist: Actor,
    tenant: Tenant, tiny: PackedModel, settings: Any,
) -> None:  # fmt: skip
    from apps.registry.models import ModelVersion
    from tests.conftest import live_workers_paused
    from workbench.client import Workbench, WorkbenchError

    settings.BATCH_CHUNK_ROWS = 64
    version = register(scientist, tenant, "intents", tiny)
    ModelVersion.objects.filter(pk=version.pk).update(stage="production")
    data = make_training_version(scientist, name="backlog", content=banking_slice(per_label=20))
    wb = Workbench(live_server.url, scientist.token, "acme")
    with live_workers_paused():  # the job runs here, not on the session's worker
        job = wb.batch_predict(data, model="intents", output_format="csv", top_k=2)
        assert job["status"] == "queued" and job["model_version"] == version.pk
        with pytest.raises(WorkbenchError) as early:
            wb.batch_output(job["id"])
        assert early.value.status == 409 and early.value.code == "no_output"
        _run(job["id"])
        done = wb.wait(job["id"], timeout=5, every=0.1)
        assert done["status"] == "succeeded" and done["rows_done"] == 120
        rows = wb.batch_rows(job["id"])
    assert [int(r["row"]) for r in rows] == list(range(120))
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["label"] == r["label"] for r in rows)
    with pytest.raises(WorkbenchError) as unknown:
        wb.batch_predict(data, model="no-such-model")
    assert unknown.value.status == 400 and unknown.value.code == "unknown_model"


# --- the dashboard -------------------------------------------------------------------------


def test_a_scientist_starts_one_on_the_page_and_follows_it_to_its_output(
    setup: Any, scientist: Actor, reviewer: Actor, viewer: Actor, settings: Any
) -> None:
    from django.test import Client

    settings.BATCH_CHUNK_ROWS = 100
    version, data = setup
    page = Client()
    page.force_login(scientist.user)
    listing = page.get("/t/acme/batch-predictions/").content.decode()
    assert 'id="batch-create-form"' in listing and f'value="{version.pk}"' in listing
    assert 'href="/t/acme/batch-predictions/" aria-current="page">Batch' in listing
    refused = page.post("/t/acme/batch-predictions/", {
        "model_version": version.pk, "dataset_version": data, "text_column": "body",
        "output_format": "jsonl", "top_k": 3})  # fmt: skip
    assert refused.status_code == 400 and "no column &#x27;body&#x27;" in refused.content.decode()
    assert not BatchPrediction.objects.exists()
    started = page.post("/t/acme/batch-predictions/", {
        "model_version": version.pk, "dataset_version": data, "text_column": "",
        "output_format": "jsonl", "top_k": 2})  # fmt: skip
    assert started.status_code == 302
    job = BatchPrediction.objects.get()
    assert started["Location"] == f"/t/acme/batch-predictions/{job.pk}/"
    queued = page.get(started["Location"]).content.decode()
    assert 'data-live-active="true"' in queued and 'id="batch-cancel-form"' in queued
    assert "0 / 180" in queued
    _run(job.pk)
    live = page.get(f"{started['Location']}?partial=1")
    assert live["Cache-Control"] == "no-store"
    done = live.content.decode()
    assert 'data-live-active="true"' not in done and "180 / 180 (100.0 %)" in done
    assert 'id="batch-download"' in done and 'id="label-chart"' in done
    assert done.count("<tr><td>") == 20  # the preview's rows
    assert 'id="batch-register-form"' not in done  # reviewers register sample sets
    review = Client()
    review.force_login(reviewer.user)
    detail = review.get(started["Location"]).content.decode()
    assert 'id="batch-register-form"' in detail
    registered = review.post(f"{started['Location']}register/", {"dataset_name": "to-label"})
    assert registered.status_code == 302
    assert "Registered as to-label v1." in review.get(started["Location"]).content.decode()
    # A viewer reads, and may not start or cancel.
    look = Client()
    look.force_login(viewer.user)
    assert 'id="batch-create-form"' not in look.get("/t/acme/batch-predictions/").content.decode()
    assert look.post(f"{started['Location']}cancel/").status_code == 403


def test_the_pages_are_404_to_another_tenant(setup: Any, scientist: Actor, outsider: Actor) -> None:
    from django.test import Client

    version, data = setup
    job = scientist.api("post", API, {"model_version": version.pk, "dataset_version": data})
    page = Client()
    page.force_login(outsider.user)
    assert page.get(f"/t/acme/batch-predictions/{job.json()['id']}/").status_code == 404
    assert page.get(f"/t/globex/batch-predictions/{job.json()['id']}/").status_code == 404
    assert page.post(f"/t/globex/batch-predictions/{job.json()['id']}/cancel/").status_code == 404
