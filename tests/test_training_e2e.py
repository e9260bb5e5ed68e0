"""Training end to end: real Celery workers on the broker, a real MLflow server, SIGKILL."""

from __future__ import annotations

import json

import pytest

from apps.audit.models import AuditEvent
from apps.core.artifacts import LocalArtifactStore
from apps.registry.models import ModelVersion
from apps.training.models import RunMetric, TrainingRun
from apps.training.packaging import unpack
from tests.conftest import start_worker, stop_worker
from tests.training_helpers import banking_slice, make_training_version, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]
RUNS = "/api/v1/tenants/acme/runs/"


def run_status(run_id: str) -> str:
    return TrainingRun.objects.get(pk=run_id).status


def launch(actor, version_id: str, **params) -> str:
    """POST a tiny-bert run with these params; its id."""
    body = {"dataset_version": version_id, "base_model": "tiny-bert", "params": params}
    response = actor.api("post", RUNS, body)
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def test_a_run_trains_on_a_worker_and_registers_one_model_version(
    celery_worker_process, mlflow_server, scientist, settings, tmp_path
):
    root = celery_worker_process.artifacts_root
    settings.ARTIFACT_STORE = f"file://{root}"
    settings.MLFLOW_TRACKING_URI = mlflow_server
    version_id = make_training_version(scientist, content=banking_slice(per_label=40))
    response = scientist.api(
        "post",
        RUNS,
        {
            "dataset_version": version_id,
            "base_model": "tiny-bert",
            "model_name": "intents",
            "params": {
                "epochs": 3,
                "batch_size": 16,
                "max_length": 32,
                "learning_rate": 0.003,
                "checkpoint_every_steps": 5,
                "checkpoint_min_seconds": 0,
            },
        },
    )
    assert response.status_code == 202, response.content
    run_id = response.json()["id"]

    seen_running = wait_for(lambda: run_status(run_id) in ("running", "succeeded", "failed"))
    assert seen_running
    wait_for(lambda: run_status(run_id) in ("succeeded", "failed"), timeout=240)
    run = scientist.api("get", f"{RUNS}{run_id}/").json()
    assert run["status"] == "succeeded", (run["error"], celery_worker_process.log()[-3000:])
    assert run["stop_reason"] == "completed" and run["stop_detail"]
    assert run["progress"]["step"] == run["progress"]["total_steps"] > 0
    assert run["metrics"]["val_accuracy"] > 0.3  # chance on 6 balanced intents is 1/6
    assert run["environment"]["dataset_sha256"] and run["environment"]["torch"]

    # The curves are there, per step and per epoch.
    points = scientist.api("get", f"{RUNS}{run_id}/metrics/?name=val_macro_f1").json()
    assert [p["epoch"] for p in points["results"]] == [1, 2, 3]
    assert RunMetric.objects.filter(run_id=run_id, name="train_loss").count() >= 2

    # Exactly one model version; its stored predictions equal a reload of its artifact.
    version = ModelVersion.objects.get(run_id=run_id)
    assert run["model_version"]["id"] == version.pk
    store = LocalArtifactStore(root)
    archive = tmp_path / "model.tar"
    archive.write_bytes(b"".join(store.iter_bytes(version.artifact_key)))
    import hashlib

    assert hashlib.sha256(archive.read_bytes()).hexdigest() == version.sha256
    assert version.size_bytes == archive.stat().st_size and version.memory_bytes > 0
    from worker.inference import load_classifier

    model_dir = unpack(archive, tmp_path / "model")
    stored = [
        json.loads(line)
        for line in b"".join(store.iter_bytes(version.predictions_key)).decode().splitlines()
    ]
    assert len(stored) >= 6
    reloaded = load_classifier(model_dir).predict([p["text"] for p in stored])
    assert [r["label"] for r in reloaded] == [p["predicted"] for p in stored]

    # MLflow has the run's params, metrics and the registered model <tenant>.<name>.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    mlflow_run = client.get_run(run["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["epochs"] == "3"
    assert "val_macro_f1" in mlflow_run.data.metrics
    registered = client.get_model_version("acme.intents", version.mlflow_version)
    assert registered.run_id == run["mlflow_run_id"]

    models = scientist.api("get", "/api/v1/tenants/acme/models/intents/versions/").json()
    assert [v["sha256"] for v in models["results"]] == [version.sha256]


def test_cancel_stops_a_running_run_within_seconds(celery_worker_process, scientist, settings):
    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    version_id = make_training_version(scientist)
    run_id = launch(scientist, version_id, epochs=100, batch_size=4)
    wait_for(lambda: TrainingRun.objects.get(pk=run_id).progress.get("step", 0) > 2, timeout=120)
    response = scientist.api("post", f"{RUNS}{run_id}/cancel")
    assert response.status_code == 200
    wait_for(lambda: run_status(run_id) == "cancelled", timeout=15)
    assert not ModelVersion.objects.filter(run_id=run_id).exists()


def test_a_killed_worker_resumes_from_its_checkpoint_on_another(
    celery_worker_process, scientist, settings
):
    root = celery_worker_process.artifacts_root
    settings.ARTIFACT_STORE = f"file://{root}"
    version_id = make_training_version(scientist)
    # Every 4 steps however fast they go: the kill must find a mid-run checkpoint.
    run_id = launch(
        scientist,
        version_id,
        epochs=8,
        batch_size=8,
        checkpoint_every_steps=4,
        checkpoint_min_seconds=0,
    )
    wait_for(lambda: (TrainingRun.objects.get(pk=run_id).checkpoint_step or 0) >= 8, timeout=180)
    # SIGKILL the whole worker (main process and pool), as a spot reclaim would.
    stop_worker(celery_worker_process, kill=True)
    killed_at = TrainingRun.objects.get(pk=run_id)
    assert killed_at.status == "running" and killed_at.checkpoint_step
    checkpoint_step = killed_at.checkpoint_step

    # Another worker, running beat too: it notices the stale heartbeat and re-queues the
    # run; the broker alone would hand the unacked task back only after its visibility
    # timeout. The session's fixture owns the new worker from here on.
    kwargs = dict(celery_worker_process.start_kwargs or {})
    rescuer = start_worker(**kwargs, name="rescuer", beat=True)
    celery_worker_process.process = rescuer.process
    celery_worker_process.log_path = rescuer.log_path
    celery_worker_process.node = rescuer.node
    wait_for(lambda: run_status(run_id) in ("succeeded", "failed"), timeout=300)
    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == "succeeded", (run.error, rescuer.log()[-3000:])
    assert run.attempt == 2
    assert any(
        f"resuming from the checkpoint at step {checkpoint_step}" in line for line in run.log_tail
    )
    resume = AuditEvent.objects.get(object_id=run_id, verb="run.resume")
    assert resume.after is not None and resume.after["checkpoint_step"] == checkpoint_step
    assert AuditEvent.objects.filter(object_id=run_id, verb="run.requeue").count() == 1
    assert ModelVersion.objects.filter(run_id=run_id).count() == 1
    assert run.progress["step"] == run.progress["total_steps"]


def test_a_checkpoint_that_cannot_be_stored_fails_the_run_with_the_reason(
    celery_worker_process, scientist, settings, tenant
):
    root = celery_worker_process.artifacts_root
    settings.ARTIFACT_STORE = f"file://{root}"
    version_id = make_training_version(scientist)
    # A real failure of the worker's store: where this tenant's checkpoints go, a file.
    blocker = root / "runs" / tenant.pk
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")
    try:
        run_id = launch(
            scientist,
            version_id,
            epochs=3,
            batch_size=8,
            checkpoint_every_steps=5,
            checkpoint_min_seconds=0,
        )
        wait_for(lambda: run_status(run_id) in ("succeeded", "failed"), timeout=180)
    finally:
        blocker.unlink()
    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == "failed", celery_worker_process.log()[-3000:]
    first_line = run.error.splitlines()[0]
    assert "ReportingError: the checkpoint at step 5 failed: NotADirectoryError" in first_line, (
        run.error
    )
    # Nothing half-done was recorded: no checkpoint to resume from, no model version.
    assert not run.checkpoint_key and run.checkpoint_step is None
    assert not ModelVersion.objects.filter(run_id=run_id).exists()
