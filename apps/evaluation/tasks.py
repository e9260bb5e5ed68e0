"""Evaluate a model version on a dataset version, on the gpu queue."""

from __future__ import annotations

import logging
import shutil
import traceback
from pathlib import Path

from celery import shared_task
from django.conf import settings

from apps.core.artifacts import download
from apps.evaluation import services

log = logging.getLogger(__name__)


@shared_task(
    name="evaluation.run",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=3600,
    time_limit=3900,
)
def run_evaluation(evaluation_id: str) -> str:
    # Safe to deliver twice: only the claim of a queued evaluation runs it.
    from apps.training.packaging import unpack
    from worker.evaluation import evaluate
    from worker.training.config import DataSpec

    evaluation = services.evaluation_claim(evaluation_id=evaluation_id)
    if evaluation is None:
        return "skipped"
    work = Path(settings.TRAINING_WORK_DIR) / f"{evaluation.pk}"
    work.mkdir(parents=True, exist_ok=True)
    try:
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
        metrics = result.to_dict()
        metrics["mlflow_logged"] = _log_to_mlflow(evaluation, metrics)
        services.evaluation_finish(
            evaluation_id=evaluation.pk,
            metrics=metrics,
            samples=[dict(p) for p in result.predictions[: settings.DEPLOYMENT_WARMUP_SAMPLES]],
        )
        return "succeeded"
    except Exception as exc:
        log.exception("evaluation failed", extra={"evaluation": evaluation_id})
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        services.evaluation_finish(evaluation_id=evaluation.pk, error=detail)
        return "failed"
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
