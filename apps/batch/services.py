"""Batch predictions: the verbs. ``batch_create`` checks the request and queues the job;
``batch_dispatch`` sends queued jobs to the GPU queue within each tenant's concurrency;
a worker ``batch_claim``s one (the next attempt), renews its lease (``batch_heartbeat``),
records each finished chunk (``batch_progress``: also where a cancel or a lost lease is
noticed) and ends it (``batch_finish``). ``batch_requeue_stale`` is the way out of a dead
worker and of a lost message; ``batch_cancel`` and ``batch_register`` are the user's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from apps.audit.services import audit_record
from apps.batch.models import ACTIVE, BatchPrediction, BatchStatus, OutputFormat
from apps.core.artifacts import get_store
from apps.core.errors import DomainError, InvalidInput
from apps.core.leases import queue_depth
from apps.datasets.models import Dataset, DatasetKind, DatasetVersion, Task
from apps.registry.models import ModelKind, ModelVersion, RegisteredModel, Stage
from apps.tenants.models import Tenant

log = logging.getLogger(__name__)
MAX_TOP_K = 20
PREVIEW_ROWS = 20
# Bytes of a dataset file read to learn its columns.
HEAD_BYTES = 64 * 1024


def _state(job: BatchPrediction) -> dict[str, Any]:
    return {"status": job.status, "attempt": job.attempt, "rows_done": job.rows_done}


def resolve_model_version(*, tenant: Tenant, model: str, environment: str = "") -> ModelVersion:
    """The version of model ``model`` in stage ``environment`` (production unless given);
    InvalidInput naming what is missing. (A version named by id the doors look up.)"""
    versions = ModelVersion.objects.filter(registered_model__tenant=tenant).select_related(
        "registered_model"
    )
    if not model:
        raise InvalidInput(
            "Name the model version to score with (model_version), or a model and its "
            "environment (model, environment).",
            code="model_required",
            fields={"model": ["Give model_version, or model (and environment)."]},
        )
    stage = environment or Stage.PRODUCTION
    if stage not in (Stage.PRODUCTION, Stage.STAGING):
        raise InvalidInput(
            "environment is production or staging.",
            code="invalid_environment",
            fields={"environment": ["production or staging"]},
        )
    if not RegisteredModel.objects.filter(tenant=tenant, name=model).exists():
        raise InvalidInput(
            f"No model named '{model}' in this tenant.",
            code="unknown_model",
            fields={"model": [f"No model named '{model}'."]},
        )
    found = versions.filter(registered_model__name=model, stage=stage).order_by("-number").first()
    if found is None:
        raise InvalidInput(
            f"Model '{model}' has no version in {stage}.",
            code="no_version_in_environment",
            fields={"environment": [f"'{model}' has no version in {stage}."]},
        )
    return found


def _columns(version: DatasetVersion) -> list[str]:
    from worker.batch import columns_of

    with get_store().open(version.storage_key) as fh:
        head = fh.read(HEAD_BYTES)
    return columns_of(head, version.format)


@transaction.atomic
def batch_create(
    *,
    actor: Any,
    tenant: Tenant,
    model_version: ModelVersion,
    dataset_version: DatasetVersion,
    text_column: str = "",
    output_format: str = OutputFormat.JSONL,
    top_k: int = 3,
    via: str = "",
) -> BatchPrediction:
    """Queue a batch prediction of ``model_version`` over ``dataset_version`` (both of
    ``tenant``: the callers resolve them so); InvalidInput, and nothing written, when the
    model cannot score it or the column is not in the file."""
    if model_version.registered_model.kind != ModelKind.CLASSIFIER:
        raise InvalidInput(
            f"Batch predictions score classifiers; '{model_version.registered_model.name}' "
            f"is an {model_version.registered_model.kind} model.",
            code="unsupported_model_kind",
            fields={"model_version": ["Not a classifier."]},
        )
    if dataset_version.dataset.task == Task.RETRIEVAL:
        raise InvalidInput(
            "A retrieval dataset's rows are query pairs, not texts to classify.",
            code="unsupported_dataset",
            fields={"dataset_version": ["A retrieval dataset."]},
        )
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput(
            f"top_k is from 1 to {MAX_TOP_K}.", code="invalid_top_k",
            fields={"top_k": [f"From 1 to {MAX_TOP_K}."]},
        )  # fmt: skip
    column = text_column or dataset_version.text_column
    columns = _columns(dataset_version)
    if column not in columns:
        raise InvalidInput(
            f"The dataset version has no column '{column}'; it has "
            f"{', '.join(columns) or 'none that could be read'}.",
            code="unknown_column",
            fields={"text_column": [f"Not a column of the file: {', '.join(columns)}."]},
        )
    job = BatchPrediction.objects.create(
        tenant=tenant,
        model_version=model_version,
        artifact_sha256=model_version.sha256,
        dataset_version=dataset_version,
        text_column=column,
        output_format=output_format,
        top_k=top_k,
        chunk_rows=settings.BATCH_CHUNK_ROWS,
        rows_total=dataset_version.rows,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="batch_prediction.create",
        obj=job,
        after={
            "model_version": model_version.pk,
            "dataset_version": dataset_version.pk,
            "text_column": column,
            "rows": job.rows_total,
        },
        via=via,
    )
    transaction.on_commit(enqueue_dispatch)
    return job


def enqueue_dispatch() -> None:
    from apps.batch.tasks import dispatch_batch

    try:
        dispatch_batch.delay()
    except Exception:  # the broker is down: beat's dispatch sends it later
        log.warning("could not enqueue the batch dispatcher")


def _send(job_id: str) -> None:
    from apps.batch.tasks import execute_batch

    try:
        execute_batch.apply_async((job_id,), queue=settings.TRAINING_QUEUE)
    except Exception:  # the broker is down: the lost-message sweep sends it again
        log.warning("could not send batch prediction %s", job_id)


def batch_dispatch() -> list[str]:
    """Send queued jobs, oldest first, while their tenant has fewer than
    ``BATCH_MAX_CONCURRENT_PER_TENANT`` sent or running; the ids sent."""
    limit = settings.BATCH_MAX_CONCURRENT_PER_TENANT
    sent: list[str] = []
    with transaction.atomic():
        waiting = list(
            BatchPrediction.objects.select_for_update(skip_locked=True)
            .filter(status=BatchStatus.QUEUED, queued_at__isnull=True)
            .order_by("created_at", "id")[:500]
        )
        if not waiting:
            return sent
        busy = dict(
            BatchPrediction.objects.filter(
                Q(status=BatchStatus.RUNNING)
                | Q(status=BatchStatus.QUEUED, queued_at__isnull=False),
                tenant_id__in={j.tenant_id for j in waiting},
            )
            .values_list("tenant_id")
            .annotate(n=Count("id"))
        )
        now = timezone.now()
        for job in waiting:
            if busy.get(job.tenant_id, 0) >= limit:
                continue
            busy[job.tenant_id] = busy.get(job.tenant_id, 0) + 1
            job.queued_at = now
            job.save(update_fields=["queued_at"])
            sent.append(job.pk)
            transaction.on_commit(functools.partial(_send, job.pk))
    return sent


def batch_claim(*, job_id: str, worker: str) -> BatchPrediction | None:
    """Take a sent job for this worker (the next attempt); None if it is not waiting."""
    with transaction.atomic():
        job = (
            BatchPrediction.objects.select_for_update()
            .filter(pk=job_id, status=BatchStatus.QUEUED, queued_at__isnull=False)
            .first()
        )
        if job is None:
            return None
        if job.cancel_requested:
            _end(job, BatchStatus.CANCELLED, reason="cancelled before it started")
            return None
        job.status = BatchStatus.RUNNING
        job.attempt += 1
        job.claimed_by = worker
        job.heartbeat_at = timezone.now()
        if job.started_at is None:
            job.started_at = job.heartbeat_at
        job.save(update_fields=["status", "attempt", "claimed_by", "heartbeat_at", "started_at"])
    return BatchPrediction.objects.select_related(
        "model_version__registered_model", "dataset_version", "tenant"
    ).get(pk=job_id)


def _fenced(job_id: str, attempt: int) -> Any:
    return BatchPrediction.objects.filter(pk=job_id, attempt=attempt, status=BatchStatus.RUNNING)


def batch_heartbeat(*, job_id: str, attempt: int) -> bool:
    """Renew the attempt's lease; False once the job is no longer this attempt's."""
    return bool(_fenced(job_id, attempt).update(heartbeat_at=timezone.now()))


@transaction.atomic
def batch_progress(
    *,
    job_id: str,
    attempt: int,
    chunks_done: int,
    rows_done: int,
    label_counts: dict[str, int],
    busy_seconds: float,
    preview: list[dict[str, Any]] | None = None,
) -> str:
    """Record that the attempt stored chunk ``chunks_done - 1``: "go" on, "cancel" (the job
    is cancelled now), or "lost" (another attempt has it: write nothing more)."""
    job = _fenced(job_id, attempt).select_for_update().first()
    if job is None:
        return "lost"
    job.chunks_done = chunks_done
    job.rows_done = rows_done
    job.label_counts = label_counts
    job.busy_seconds = busy_seconds
    job.heartbeat_at = timezone.now()
    fields = ["chunks_done", "rows_done", "label_counts", "busy_seconds", "heartbeat_at"]
    if preview is not None:
        job.preview = preview[:PREVIEW_ROWS]
        fields.append("preview")
    job.save(update_fields=fields)
    if job.cancel_requested:
        _end(job, BatchStatus.CANCELLED, reason="cancelled while running")
        return "cancel"
    return "go"


@transaction.atomic
def batch_finish(
    *,
    job_id: str,
    attempt: int,
    output_key: str = "",
    output_sha256: str = "",
    output_size_bytes: int = 0,
    error: str = "",
) -> BatchPrediction | None:
    """End the attempt: the output recorded (succeeded) or ``error`` (failed); None and
    nothing written if the attempt was superseded."""
    job = _fenced(job_id, attempt).select_for_update().first()
    if job is None:
        return None
    if error:
        job.error = error[-4000:]
        _end(job, BatchStatus.FAILED, reason="error")
        return job
    job.output_key = output_key
    job.output_sha256 = output_sha256
    job.output_size_bytes = output_size_bytes
    _end(job, BatchStatus.SUCCEEDED, reason="done",
         fields=("output_key", "output_sha256", "output_size_bytes"))  # fmt: skip
    return job


def _end(
    job: BatchPrediction,
    status: str,
    *,
    reason: str,
    actor: Any = None,
    via: str = "task",
    fields: tuple[str, ...] = (),
) -> None:
    """Finish ``job`` as ``status`` (with ``fields`` the caller set), audited."""
    before = _state(job)
    job.status = status
    job.finished_at = timezone.now()
    job.save(update_fields=["status", "finished_at", "error", *fields])
    audit_record(
        actor=actor,
        tenant=job.tenant,
        verb=f"batch_prediction.{status}",
        obj=job,
        before=before,
        after={**_state(job), "reason": reason},
        via=via,
    )
    transaction.on_commit(enqueue_dispatch)


@transaction.atomic
def batch_cancel(*, actor: Any, job: BatchPrediction, via: str = "") -> BatchPrediction:
    """A queued job is cancelled at once; a running one stops after its current chunk."""
    locked = BatchPrediction.objects.select_for_update().get(pk=job.pk)
    if locked.status not in ACTIVE:
        raise DomainError(
            f"The batch prediction is {locked.status}; only a queued or running one can be "
            "cancelled.",
            code="not_active",
            status=locked.status,
        )
    if locked.status == BatchStatus.QUEUED and locked.queued_at is None:
        _end(locked, BatchStatus.CANCELLED, reason="cancelled", actor=actor, via=via)
        return locked
    locked.cancel_requested = True
    locked.save(update_fields=["cancel_requested"])
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="batch_prediction.cancel_request",
        obj=locked,
        before=_state(locked),
        after={**_state(locked), "cancel_requested": True},
        via=via,
    )
    return locked


def _stale() -> Q:
    cutoff = timezone.now() - timedelta(seconds=settings.BATCH_HEARTBEAT_TIMEOUT_SECONDS)
    return Q(status=BatchStatus.RUNNING) & (
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)
    )


def batch_requeue_stale() -> list[str]:
    """A running job whose lease ran out lost its worker: queued again (to resume at its
    first chunk not recorded), or failed after ``BATCH_MAX_ATTEMPTS`` such losses. A sent
    job no worker claimed within ``TRAINING_DISPATCH_TIMEOUT_SECONDS`` while the queue is
    empty lost its message and is sent again. The ids sent again."""
    again: list[str] = []
    for job_id in BatchPrediction.objects.filter(_stale()).values_list("pk", flat=True):
        with transaction.atomic():
            job = BatchPrediction.objects.select_for_update().filter(_stale(), pk=job_id).first()
            if job is None:
                continue
            if job.attempt >= settings.BATCH_MAX_ATTEMPTS:
                job.error = (
                    f"The worker running it was lost {job.attempt} times (the last: "
                    f"{job.claimed_by or 'unknown'}), so it is not retried again."
                )
                _end(job, BatchStatus.FAILED, reason="worker lost")
                continue
            before = _state(job)
            job.status = BatchStatus.QUEUED
            job.claimed_by = ""
            job.queued_at = None  # the dispatcher sends it within the tenant's bound
            job.save(update_fields=["status", "claimed_by", "queued_at"])
            audit_record(
                actor=None,
                tenant=job.tenant,
                verb="batch_prediction.requeue",
                obj=job,
                before=before,
                after={**_state(job), "reason": "heartbeat stale"},
                via="task",
            )
            again.append(job.pk)
    cutoff = timezone.now() - timedelta(seconds=settings.TRAINING_DISPATCH_TIMEOUT_SECONDS)
    lost = list(
        BatchPrediction.objects.filter(status=BatchStatus.QUEUED, queued_at__lt=cutoff).values_list(
            "pk", flat=True
        )
    )
    if lost and queue_depth(settings.TRAINING_QUEUE) == 0:
        for job_id in lost:
            BatchPrediction.objects.filter(pk=job_id).update(queued_at=timezone.now())
            _send(job_id)
            again.append(job_id)
    if again:
        batch_dispatch()
    return again


@transaction.atomic
def batch_register(
    *, actor: Any, job: BatchPrediction, dataset_name: str, via: str = ""
) -> DatasetVersion:
    """Make the output a version of the tenant's sample dataset ``dataset_name`` (created
    when missing): each row's text with the predicted label, for review and labelling."""
    from apps.datasets import services as dataset_services

    if job.status != BatchStatus.SUCCEEDED:
        raise DomainError(
            f"The batch prediction is {job.status}; only a succeeded one has an output.",
            code="no_output",
            status=job.status,
        )
    dataset = Dataset.objects.filter(tenant=job.tenant, name=dataset_name).first()
    if dataset is None:
        dataset = dataset_services.dataset_create(
            actor=actor,
            tenant=job.tenant,
            name=dataset_name,
            kind=DatasetKind.SAMPLE,
            task=Task.TEXT_CLASSIFICATION,
            description=f"Predictions of batch {job.pk} ({job.model_version}), for review.",
            via=via,
        )
    elif dataset.kind != DatasetKind.SAMPLE or dataset.task != Task.TEXT_CLASSIFICATION:
        raise InvalidInput(
            f"'{dataset_name}' is a {dataset.kind} dataset; predictions go into a sample one.",
            code="not_a_sample_dataset",
            fields={"dataset_name": ["Not a sample classification dataset."]},
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.csv"
        size = _write_labelled(job, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        result = dataset_services.dataset_version_create(
            actor=actor,
            dataset=dataset,
            path=path,
            sha256=digest,
            size_bytes=size,
            filename=f"{job.pk}.csv",
            text_column="text",
            label_column="label",
            via=via,
        )
    job.registered_version = result.version
    job.save(update_fields=["registered_version"])
    return result.version


def _write_labelled(job: BatchPrediction, path: Path) -> int:
    """The output as a two-column CSV (text, predicted label); its size."""
    import csv
    import io
    import json

    store = get_store()
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        with store.open(job.output_key) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            if job.output_format == OutputFormat.JSONL:
                for line in text:
                    if line.strip():
                        row = json.loads(line)
                        writer.writerow([row["text"], row["label"]])
            else:
                for row in csv.DictReader(text):
                    writer.writerow([row["text"], row["label"]])
    return path.stat().st_size
