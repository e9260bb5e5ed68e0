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
from apps.datasets.models import Task
from apps.evaluation import selectors, services
from apps.training.runner import worker_name

log = logging.getLogger(__name__)
# Wrong queries kept per evaluation of a tenant's own retrieval set (the review page's list),
# and how many of each one's first results.
MAX_WRONG_QUERIES = 200
WRONG_QUERY_RESULTS = 3


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
        task = evaluation.dataset_version.dataset.task
        if task == Task.RETRIEVAL:
            metrics, samples, extra = _evaluate_retrieval(evaluation, work)
        elif task == Task.TEXT_GENERATION:
            metrics, samples, extra = _evaluate_autocomplete(evaluation, work)
        else:
            (metrics, samples), extra = _evaluate(evaluation, work), {}
        # A superseded attempt logs nothing to MLflow and records nothing.
        if not heartbeat.held or not services.evaluation_heartbeat(
            evaluation_id=evaluation_id, attempt=attempt
        ):
            return "lost"
        metrics["mlflow_logged"] = _log_to_mlflow(evaluation, metrics)
        finished = services.evaluation_finish(
            evaluation_id=evaluation_id,
            attempt=attempt,
            metrics=metrics,
            samples=samples,
            **extra,
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
    from worker.evaluation import evaluate
    from worker.training.config import DataSpec

    model_dir = _download_model(evaluation, work)
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


def _download_model(evaluation: Any, work: Path) -> Path:
    from apps.training.packaging import unpack

    digest = download(evaluation.model_version.artifact_key, work / "model.tar")
    if digest != evaluation.artifact_sha256:
        raise RuntimeError(
            f"the stored model's sha256 is {digest}, not the {evaluation.artifact_sha256} "
            "this evaluation was asked for; refusing to evaluate other bytes"
        )
    return Path(unpack(work / "model.tar", work / "model"))


def _evaluate_retrieval(
    evaluation: Any, work: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """An embedding model on a golden retrieval set against its own documents, and the
    un-tuned base it was trained from measured the same way (max length and document text
    as the version's), reused from an earlier evaluation of the same set when one measured
    the same base so. The metrics, the warm-up samples, and ``base_metrics`` and
    ``wrong_queries`` for ``evaluation_finish``."""
    import torch

    from worker.embeddings import base_embedder, load_embedder
    from worker.retrieval_data import read_documents, read_pairs
    from worker.retrieval_eval import evaluate_retrieval
    from worker.training.config import DataSpec

    model_dir = _download_model(evaluation, work)
    data = evaluation.dataset_version
    if not data.documents_storage_key:
        raise RuntimeError(f"dataset version {data.pk} has no documents to search")
    pairs_path = work / f"pairs.{data.format}"
    documents_path = work / f"documents.{data.documents_format}"
    download(data.storage_key, pairs_path)
    download(data.documents_storage_key, documents_path)
    pairs = read_pairs(
        DataSpec(
            path=pairs_path,
            text_column=data.text_column,
            label_column=data.label_column,
            format=data.format,
        )
    )
    documents = read_documents(documents_path, data.documents_format)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    embedder = load_embedder(model_dir, device=device)
    result = evaluate_retrieval(embedder, pairs, documents)

    base_key: dict[str, Any] = {
        "base_model": embedder.base_model,
        "base_sha256": embedder.base_sha256,
        "max_length": embedder.max_length,
        "document_fields": embedder.document_fields,
    }
    reused = selectors.cached_base_metrics(dataset_version_id=data.pk, **base_key)
    if reused is not None:
        base_metrics = {**reused.base_metrics, "reused_from": reused.pk}
    else:
        base = base_embedder(
            embedder.base_model,
            max_length=embedder.max_length,
            device=device,
            document_fields=embedder.document_fields,
        )
        base_metrics = {**evaluate_retrieval(base, pairs, documents).summary(), **base_key}
        base_metrics["reused_from"] = None

    # Query texts reach the tenant (the review page, the warm-up's mismatches): kept only of
    # the tenant's own sets; a shared golden set's rows are for staff eyes only.
    own = data.dataset.tenant_id is not None
    titles = {d.id: d.title for d in documents}
    wrong = [
        {
            "query": q.query,
            "document_id": q.document_id,
            "title": titles.get(q.document_id, ""),
            "relevant": q.relevant,
            "first_hit": q.first_hit,
            "ranked": [
                {"document_id": i, "title": titles.get(i, ""), "score": s}
                for i, s in zip(
                    q.ids[:WRONG_QUERY_RESULTS], q.scores[:WRONG_QUERY_RESULTS], strict=True
                )
            ],
        }
        for q in result.wrong[:MAX_WRONG_QUERIES]
    ]
    samples = (
        [
            *({"role": "query", **w} for w in result.warmup_queries),
            *({"role": "document", **w} for w in result.warmup_documents),
        ]
        if own
        else []
    )
    metrics = {**result.summary(), "documents_sha256": data.documents_sha256}
    return (
        metrics,
        samples,
        {"base_metrics": base_metrics, "wrong_queries": wrong if own else []},
    )


def _replies(version: Any, path: Path) -> list[Any]:
    """A text-generation version's replies (``label_column``: its context column)."""
    from worker.reply_data import read_replies
    from worker.training.config import DataSpec

    download(version.storage_key, path)
    return read_replies(
        DataSpec(
            path=path,
            text_column=version.text_column,
            label_column=version.label_column,
            format=version.format,
        )
    )


def _evaluate_autocomplete(
    evaluation: Any, work: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """An autocomplete model on a golden reply corpus, and the per-tenant word trigram
    fitted on the version's training corpus measured the same way beside it (the champion
    where none is in production). The metrics, the held-out completions (the review page's
    samples and the deployment's warm-up), and ``base_metrics`` for ``evaluation_finish``.
    A sample set's ``max_rows`` caps the replies measured."""
    import torch

    from worker.autocomplete import load_completer
    from worker.autocomplete_eval import MAX_REPLIES, evaluate_autocomplete
    from worker.trigram import BASE_MODEL, Trigram

    model_dir = _download_model(evaluation, work)
    data = evaluation.dataset_version
    golden = _replies(data, work / f"golden.{data.format}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    completer = load_completer(model_dir, device=device)
    limit = min(MAX_REPLIES, evaluation.max_rows or MAX_REPLIES)
    result = evaluate_autocomplete(completer, golden, max_replies=limit)

    trained_on = evaluation.model_version.run.dataset_version
    trigram = Trigram.fit(_replies(trained_on, work / f"train.{trained_on.format}"))
    base = evaluate_autocomplete(trigram, golden, max_replies=limit)
    base_metrics = {
        **base.summary(),
        "base_model": BASE_MODEL,
        "trained_on": trained_on.pk,
        "trained_on_sha256": trained_on.sha256,
        "trained_replies": trigram.replies,
    }
    # Reply texts reach the tenant (the review page, the warm-up's mismatches): kept only of
    # the tenant's own sets; a shared golden set's rows are for staff eyes only.
    own = data.dataset.tenant_id is not None
    metrics = {**result.summary(), "base_model": completer.meta.get("base_model", "")}
    return metrics, result.samples if own else [], {"base_metrics": base_metrics}


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
        for key in (
            "accuracy",
            "macro_f1",
            "ece",
            "latency_ms_p50",
            "latency_ms_p95",
            *services.RETRIEVAL_METRICS,
            *services.AUTOCOMPLETE_METRICS,
            *services.AUTOCOMPLETE_LATENCY,
        ):
            value = metrics.get(key)
            if isinstance(value, int | float):
                client.log_metric(run_id, f"eval.{name}.{key}", float(value))
    except Exception:
        log.warning("could not log the evaluation to MLflow", exc_info=True)
        return False
    return True
