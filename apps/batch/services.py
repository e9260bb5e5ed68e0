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
from django.db.models import Q
from django.utils import timezone

from apps.audit.services import audit_record
from apps.batch.models import ACTIVE, BatchPrediction, BatchStatus, OutputFormat
from apps.core.artifacts import get_store
from apps.core.errors import DomainError, InvalidInput
from apps.core.leases import gone_holders, holder_gone, lost_reason, queue_depth
from apps.datasets.models import Dataset, DatasetKind, DatasetVersion, Task
from apps.registry.models import ModelKind, ModelVersion, RegisteredModel, Stage
from apps.tenants.models import Tenant

log = logging.getLogger(__name__)
MAX_TOP_K = 20
PREVIEW_ROWS = 20
# A batch prediction's id starts so (apps.core.ids): how the GPU dispatcher's ids tell.
BATCH_ID_PREFIX = "bp_"
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


def _check_options(
    *,
    kind: str,
    dataset_version: DatasetVersion,
    output_format: str,
    top_k: int,
    role: str,
    max_tokens: int,
    completions: int,
) -> str:
    """The output format the job writes (the kind's default when empty); InvalidInput
    naming the field a model of this kind cannot take."""
    from worker import autocomplete_text as limits
    from worker.batch import FORMATS

    formats = FORMATS.get(kind)
    if formats is None:
        raise InvalidInput(
            f"Batch predictions cannot score a {kind} model.", code="unsupported_model_kind",
            fields={"model_version": [f"A {kind} model."]},
        )  # fmt: skip
    task = dataset_version.dataset.task
    if task == Task.RETRIEVAL and kind != ModelKind.EMBEDDING:
        raise InvalidInput(
            "A retrieval dataset's rows are queries for an embedding model; a "
            f"{kind} model scores texts of a classification or reply dataset.",
            code="unsupported_dataset",
            fields={"dataset_version": ["A retrieval dataset."]},
        )
    output_format = output_format or formats[0]
    if output_format not in formats:
        raise InvalidInput(
            f"A {kind} model's output is {' or '.join(formats)}, not {output_format}.",
            code="invalid_output_format",
            fields={"output_format": [f"One of {', '.join(formats)}."]},
        )
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput(
            f"top_k is from 1 to {MAX_TOP_K}.", code="invalid_top_k",
            fields={"top_k": [f"From 1 to {MAX_TOP_K}."]},
        )  # fmt: skip
    if kind == ModelKind.EMBEDDING and role not in ("query", "document"):
        raise InvalidInput(
            "role is query or document (which encoder embeds the texts).",
            code="invalid_role", fields={"role": ["query or document"]},
        )  # fmt: skip
    if kind == ModelKind.AUTOCOMPLETE:
        if not 1 <= max_tokens <= limits.MAX_TOKENS_LIMIT:
            raise InvalidInput(
                f"max_tokens is from 1 to {limits.MAX_TOKENS_LIMIT}.", code="invalid_max_tokens",
                fields={"max_tokens": [f"From 1 to {limits.MAX_TOKENS_LIMIT}."]},
            )  # fmt: skip
        if not 1 <= completions <= limits.N_LIMIT:
            raise InvalidInput(
                f"completions is from 1 to {limits.N_LIMIT}.", code="invalid_completions",
                fields={"completions": [f"From 1 to {limits.N_LIMIT}."]},
            )  # fmt: skip
    return output_format


def _column_error(field: str, column: str, columns: list[str]) -> InvalidInput:
    return InvalidInput(
        f"The dataset version has no column '{column}'; it has "
        f"{', '.join(columns) or 'none that could be read'}.",
        code="unknown_column",
        fields={field: [f"Not a column of the file: {', '.join(columns)}."]},
    )


@transaction.atomic
def batch_create(
    *,
    actor: Any,
    tenant: Tenant,
    model_version: ModelVersion,
    dataset_version: DatasetVersion,
    text_column: str = "",
    output_format: str = "",
    top_k: int = 3,
    role: str = "",
    context_column: str | None = None,
    max_tokens: int = 0,
    completions: int = 1,
    via: str = "",
) -> BatchPrediction:
    """Queue a batch prediction of ``model_version`` over ``dataset_version`` (both of
    ``tenant``: the callers resolve them so); InvalidInput, and nothing written, when the
    model cannot score it or a column is not in the file.

    A classifier writes each row's ``top_k`` labels; an embedding model the vectors of
    ``role``'s encoder (query unless given); an autocomplete model ``completions``
    completions of at most ``max_tokens`` tokens of each row's text as the reply's prefix,
    with ``context_column``'s message (a reply dataset's context column unless given;
    ``""`` none)."""
    from worker import autocomplete_text as limits

    kind = model_version.registered_model.kind
    role = role or ("query" if kind == ModelKind.EMBEDDING else "")
    max_tokens = max_tokens or (limits.MAX_TOKENS_DEFAULT if kind == ModelKind.AUTOCOMPLETE else 0)
    output_format = _check_options(
        kind=kind, dataset_version=dataset_version, output_format=output_format, top_k=top_k,
        role=role, max_tokens=max_tokens, completions=completions,
    )  # fmt: skip
    column = text_column or dataset_version.text_column
    columns = _columns(dataset_version)
    if column not in columns:
        raise _column_error("text_column", column, columns)
    context = ""
    if kind == ModelKind.AUTOCOMPLETE:
        if context_column is None:
            is_replies = dataset_version.dataset.task == Task.TEXT_GENERATION
            context = dataset_version.label_column if is_replies else ""
        else:
            context = context_column
        if context and context not in columns:
            raise _column_error("context_column", context, columns)
    elif context_column:
        raise InvalidInput(
            "context_column is for autocomplete models (the messages replies answer).",
            code="unexpected_field",
            fields={"context_column": [f"A {kind} model takes no context."]},
        )
    job = BatchPrediction.objects.create(
        tenant=tenant,
        model_version=model_version,
        artifact_sha256=model_version.sha256,
        dataset_version=dataset_version,
        model_kind=kind,
        text_column=column,
        context_column=context,
        output_format=output_format,
        top_k=top_k,
        role=role,
        max_tokens=max_tokens if kind == ModelKind.AUTOCOMPLETE else 0,
        completions=completions if kind == ModelKind.AUTOCOMPLETE else 1,
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
            "kind": kind,
            "text_column": column,
            "output_format": output_format,
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
    """Send queued jobs within the GPU budget: a batch prediction is its tenant's GPU job
    like a training run, so the training dispatcher decides (``runs_dispatch``: fair share,
    the tenant's ``max_concurrent_runs``); the batch ids it sent."""
    from apps.training.services import runs_dispatch

    return [pk for pk in runs_dispatch() if pk.startswith(BATCH_ID_PREFIX)]


def gpu_waiting() -> list[tuple[str, str, Any]]:
    """(id, tenant id, created) of each job waiting to be sent, for the GPU dispatcher."""
    return list(
        BatchPrediction.objects.filter(status=BatchStatus.QUEUED, queued_at__isnull=True)
        .order_by("created_at", "id")
        .values_list("pk", "tenant_id", "created_at")[:500]
    )


def gpu_busy() -> list[str]:
    """The tenant id of each job sent or running (it holds a GPU slot)."""
    return list(
        BatchPrediction.objects.filter(
            Q(status=BatchStatus.RUNNING) | Q(status=BatchStatus.QUEUED, queued_at__isnull=False)
        ).values_list("tenant_id", flat=True)
    )


def gpu_send(job_id: str, now: Any) -> bool:
    """Claim a waiting job for the broker (sent once its transaction commits)."""
    claimed = BatchPrediction.objects.filter(
        pk=job_id, status=BatchStatus.QUEUED, queued_at__isnull=True
    ).update(queued_at=now)
    if claimed:
        transaction.on_commit(functools.partial(_send, job_id))
    return bool(claimed)


def batch_claim(*, job_id: str, worker: str) -> BatchPrediction | None:
    """Take a sent job for this worker (the next attempt); None if it is not waiting. A
    running job whose holder is a dead process of this host (a pool process SIGKILLed:
    its master sends the task again at once) is taken over without waiting out its
    lease."""
    with transaction.atomic():
        job = BatchPrediction.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            return None
        if job.status == BatchStatus.RUNNING and holder_gone(job.claimed_by):
            _requeue(job, reason="worker process gone", sent=True)
        if job.status != BatchStatus.QUEUED or job.queued_at is None:
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


def batch_set_dim(*, job_id: str, attempt: int, dim: int) -> None:
    """Record the width of an embedding job's vectors (known once its model is loaded)."""
    _fenced(job_id, attempt).update(dim=dim)


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


def _requeue(job: BatchPrediction, *, reason: str, sent: bool = False) -> bool:
    """A running job whose worker was lost: queued again to resume at its first chunk not
    recorded (``sent``: for the claim at hand, else for the dispatcher to send within
    the GPU budget), or failed after ``BATCH_MAX_ATTEMPTS`` such losses; whether it was
    queued."""
    if job.attempt >= settings.BATCH_MAX_ATTEMPTS:
        job.error = (
            f"The worker running it was lost {job.attempt} times (the last: "
            f"{job.claimed_by or 'unknown'}), so it is not retried again."
        )
        _end(job, BatchStatus.FAILED, reason="worker lost")
        return False
    before = _state(job)
    job.status = BatchStatus.QUEUED
    job.claimed_by = ""
    job.queued_at = timezone.now() if sent else None
    job.save(update_fields=["status", "claimed_by", "queued_at"])
    audit_record(
        actor=None,
        tenant=job.tenant,
        verb="batch_prediction.requeue",
        obj=job,
        before=before,
        after={**_state(job), "reason": reason},
        via="task",
    )
    return True


def batch_requeue_stale() -> list[str]:
    """A running job whose lease ran out, or whose holder is a dead process of this host,
    lost its worker: queued again (``_requeue``). A sent job no worker claimed within
    ``TRAINING_DISPATCH_TIMEOUT_SECONDS`` while the queue is empty lost its message and is
    sent again. The ids sent again."""
    again: list[str] = []
    running = BatchPrediction.objects.filter(status=BatchStatus.RUNNING)
    stale = list(running.filter(_stale()).values_list("pk", flat=True))
    for job_id in dict.fromkeys([*stale, *gone_holders(running)]):
        with transaction.atomic():
            job = running.select_for_update().filter(pk=job_id).first()
            if job is None:
                continue
            reason = lost_reason(job.claimed_by, stale=running.filter(_stale(), pk=job_id).exists())
            if reason is None:
                continue
            if _requeue(job, reason=reason):
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
    when missing), for review and labelling: a classifier's rows as each text with its
    predicted label; an autocomplete model's as replies (the prefix and its completion)
    with the message each answers. An embedding job's vectors are no dataset (409)."""
    from apps.datasets import services as dataset_services

    if job.status != BatchStatus.SUCCEEDED:
        raise DomainError(
            f"The batch prediction is {job.status}; only a succeeded one has an output.",
            code="no_output",
            status=job.status,
        )
    if job.model_kind == ModelKind.EMBEDDING:
        raise DomainError(
            "An embedding job's output is vectors, not rows with labels: download it.",
            code="not_registrable",
            status=job.status,
        )
    replies = job.model_kind == ModelKind.AUTOCOMPLETE
    task = Task.TEXT_GENERATION if replies else Task.TEXT_CLASSIFICATION
    dataset = Dataset.objects.filter(tenant=job.tenant, name=dataset_name).first()
    if dataset is None:
        what = "Completions" if replies else "Predictions"
        dataset = dataset_services.dataset_create(
            actor=actor,
            tenant=job.tenant,
            name=dataset_name,
            kind=DatasetKind.SAMPLE,
            task=task,
            description=f"{what} of batch {job.pk} ({job.model_version}), for review.",
            via=via,
        )
    elif dataset.kind != DatasetKind.SAMPLE or dataset.task != task:
        raise InvalidInput(
            f"'{dataset_name}' is a {dataset.kind} {dataset.task} dataset; this output goes "
            f"into a sample {task} one.",
            code="not_a_sample_dataset",
            fields={"dataset_name": [f"Not a sample {task} dataset."]},
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
            context_column="context" if replies else None,
            via=via,
        )
    job.registered_version = result.version
    job.save(update_fields=["registered_version"])
    return result.version


def _output_rows(job: BatchPrediction) -> Any:
    """The output's rows as dicts (JSON lines or CSV)."""
    import csv
    import io
    import json

    with get_store().open(job.output_key) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        if job.output_format == OutputFormat.JSONL:
            for line in text:
                if line.strip():
                    yield json.loads(line)
        else:
            yield from csv.DictReader(text)


def _write_labelled(job: BatchPrediction, path: Path) -> int:
    """The output as a two-column CSV: (text, predicted label), or for completions
    (context, text: the prefix and its completion; rows without one left out); its size."""
    import csv

    replies = job.model_kind == ModelKind.AUTOCOMPLETE
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["context", "text"] if replies else ["text", "label"])
        for row in _output_rows(job):
            if not replies:
                writer.writerow([row["text"], row["label"]])
            elif row["completion"]:
                writer.writerow([row["context"], row["prefix"] + row["completion"]])
    return path.stat().st_size
