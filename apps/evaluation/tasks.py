"""Evaluate a model version on a dataset version, on the gpu queue."""

from __future__ import annotations

import logging
import os
import shutil
import traceback
from pathlib import Path
from typing import Any

from celery import shared_task
from django.conf import settings

from apps.core.artifacts import download
from apps.core.leases import Heartbeat
from apps.evaluation import services
from apps.training.runner import worker_name

log = logging.getLogger(__name__)


@shared_task(
    name="evaluation.run",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=3600,
    time_limit=3900,
)
def run_evaluation(evaluation_id: str) -> str:
    # Safe to deliver twice: only the claim of a queued evaluation runs it. Claimed first,
    # before the seconds of importing torch, so it shows `running` at once.
    evaluation = services.evaluation_claim(evaluation_id=evaluation_id, worker=worker_name())
    if evaluation is None:
        return "skipped"
    attempt = evaluation.attempt
    # The lease: a worker that dies stops renewing it and the reaper re-queues the evaluation.
    heartbeat = Heartbeat(
        lambda: services.evaluation_heartbeat(evaluation_id=evaluation_id, attempt=attempt),
        every=settings.EVALUATION_HEARTBEAT_TIMEOUT_SECONDS / 6,
        lease_seconds=settings.EVALUATION_HEARTBEAT_TIMEOUT_SECONDS,
        max_failures=settings.TRAINING_HEARTBEAT_MAX_FAILURES,
        name=f"heartbeat-{evaluation_id}-a{attempt}",
    )
    heartbeat.start()
    work = Path(settings.TRAINING_WORK_DIR) / f"{evaluation.pk}-a{attempt}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        metrics, samples = _evaluate(evaluation, work)
        # A superseded attempt logs nothing to MLflow and records nothing.
        if not heartbeat.held or not services.evaluation_heartbeat(
            evaluation_id=evaluation_id, attempt=attempt
        ):
            return "lost"
        metrics["mlflow_logged"] = _log_to_mlflow(evaluation, metrics)
        finished = services.evaluation_finish(
            evaluation_id=evaluation_id, attempt=attempt, metrics=metrics, samples=samples
        )
        return "succeeded" if finished is not None else "lost"
    except Exception as exc:
        log.exception("evaluation failed", extra={"evaluation": evaluation_id})
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        failed = services.evaluation_finish(
            evaluation_id=evaluation_id, attempt=attempt, error=detail
        )
        return "failed" if failed is not None else "lost"
    finally:
        heartbeat.close()
        shutil.rmtree(work, ignore_errors=True)


def _evaluate(evaluation: Any, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Download the model (refusing other bytes than the evaluated sha256) and the data,
    and evaluate; the metrics and the warm-up samples."""
    from apps.training.packaging import unpack
    from worker.evaluation import evaluate
    from worker.training.config import DataSpec

    version = evaluation.model_version
    digest = download(version.artifact_key, work / "model.tar")
    if digest != evaluation.artifact_sha256:
        raise RuntimeError(
            f"the stored model's sha256 is {digest}, not the {evaluation.artifact_sha256} "
            "this evaluation was asked for; refusing to evaluate other bytes"
        )
    model_dir = unpack(work / "model.tar", work / "model")
    data = evaluation.dataset_version
    path = work / f"data.{data.format}"
    download(data.storage_key, path)
    result = evaluate(
        model_dir,
        DataSpec(
            path=path,
            text_column=data.text_column,
            label_column=data.label_column,
            format=data.format,
        ),
        max_rows=evaluation.max_rows,
    )
    # Warm-up samples (their text reaches the tenant) are kept only of the tenant's own
    # sets: a shared golden set's rows are for staff eyes only.
    samples = (
        [dict(p) for p in result.predictions[: settings.DEPLOYMENT_WARMUP_SAMPLES]]
        if data.dataset.tenant_id is not None
        else []
    )
    return result.to_dict(), samples


@shared_task(name="evaluation.requeue_stale", soft_time_limit=60, time_limit=90)
def requeue_stale() -> list[str]:
    return services.evaluations_requeue_stale()


def _log_to_mlflow(evaluation: object, metrics: dict[str, object]) -> bool:
    """Log the headline numbers to the model's own MLflow run (``eval.<dataset>.<metric>``)."""
    from mlflow.tracking import MlflowClient

    run_id = evaluation.model_version.run.mlflow_run_id  # type: ignore[attr-defined]
    if not run_id:
        return False
    name = evaluation.dataset_version.dataset.name  # type: ignore[attr-defined]
    try:
        client = MlflowClient(tracking_uri=settings.MLFLOW_TRACKING_URI)
        for key in ("accuracy", "macro_f1", "ece", "latency_ms_p50", "latency_ms_p95"):
            value = metrics.get(key)
            if isinstance(value, int | float):
                client.log_metric(run_id, f"eval.{name}.{key}", float(value))
    except Exception:
        log.warning("could not log the evaluation to MLflow", exc_info=True)
        return False
    return True
