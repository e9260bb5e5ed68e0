"""Batch prediction tasks: the dispatcher, the reaper, and the job itself (GPU queue)."""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from celery import shared_task
from django.conf import settings

from apps.batch import services
from apps.core.artifacts import download, get_store
from apps.core.leases import Heartbeat
from apps.training.runner import worker_name

log = logging.getLogger(__name__)


@shared_task(name="batch.dispatch")
def dispatch_batch() -> int:
    return len(services.batch_dispatch())


@shared_task(name="batch.requeue_stale")
def requeue_stale_batch() -> int:
    return len(services.batch_requeue_stale())


@shared_task(
    name="batch.execute",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=6 * 3600,
    time_limit=6 * 3600 + 300,
)
def execute_batch(job_id: str) -> str:
    # Safe to deliver twice: only the claim of a sent job runs it.
    job = services.batch_claim(job_id=job_id, worker=worker_name())
    if job is None:
        return "skipped"
    attempt = job.attempt
    heartbeat = Heartbeat(
        lambda: services.batch_heartbeat(job_id=job_id, attempt=attempt),
        every=settings.BATCH_HEARTBEAT_TIMEOUT_SECONDS / 6,
        lease_seconds=settings.BATCH_HEARTBEAT_TIMEOUT_SECONDS,
        max_failures=settings.TRAINING_HEARTBEAT_MAX_FAILURES,
        name=f"heartbeat-{job_id}-a{attempt}",
    )
    heartbeat.start()
    work = Path(settings.TRAINING_WORK_DIR) / f"{job.pk}-a{attempt}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(job, attempt, heartbeat, work)
    except Exception as exc:
        log.exception("batch prediction failed", extra={"batch_prediction": job_id})
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        failed = services.batch_finish(job_id=job_id, attempt=attempt, error=detail)
        return "failed" if failed is not None else "lost"
    finally:
        heartbeat.close()
        shutil.rmtree(work, ignore_errors=True)


def _run(job: Any, attempt: int, heartbeat: Heartbeat, work: Path) -> str:
    from worker import batch
    from worker.serving.loading import load_model

    store = get_store()
    data = job.dataset_version
    path = work / f"data.{data.format}"
    download(data.storage_key, path)
    if job.context_column:
        texts, contexts = batch.read_columns(
            path, data.format, [job.text_column, job.context_column]
        )
    else:
        texts = batch.read_texts(path, data.format, job.text_column)
        contexts = [""] * len(texts)
    # The bytes the job was asked for, or nothing: load_model verifies the sha256.
    served = load_model(store.uri(job.model_version.artifact_key), job.artifact_sha256).classifier
    scorer = batch.scorer_for(
        served,
        batch.Options(
            fmt=job.output_format, top_k=job.top_k, role=job.role or "query",
            max_tokens=job.max_tokens or 1, n=job.completions or 1,
        ),
    )  # fmt: skip
    if scorer.kind != job.model_kind:
        raise TypeError(f"the artifact holds a {scorer.kind} model, not a {job.model_kind} one")
    if isinstance(scorer, batch.EmbeddingScorer) and job.dim != scorer.dim:
        services.batch_set_dim(job_id=job.pk, attempt=attempt, dim=scorer.dim)
    size = job.chunk_rows
    chunks = (len(texts) + size - 1) // size
    counts = Counter({str(k): int(v) for k, v in (job.label_counts or {}).items()})
    busy = job.busy_seconds
    preview = list(job.preview or [])
    for index in range(job.chunks_done, chunks):
        if not heartbeat.held:
            return "lost"
        started = time.perf_counter()
        first = index * size
        chunk = texts[first : first + size]
        part = scorer.part(first, chunk, contexts[first : first + size])
        target = work / f"part-{index:05d}"
        target.write_bytes(part.data)
        store.put_file(_part_key(job, index), target, move=True)
        counts.update(part.labels)
        busy += time.perf_counter() - started
        grew = len(preview) < services.PREVIEW_ROWS
        if grew:
            preview += part.preview[: services.PREVIEW_ROWS - len(preview)]
        verdict = services.batch_progress(
            job_id=job.pk,
            attempt=attempt,
            chunks_done=index + 1,
            rows_done=first + len(chunk),
            label_counts=dict(counts),
            busy_seconds=busy,
            preview=preview if grew else None,  # written once it is full, not again
        )
        if verdict != "go":
            return "cancelled" if verdict == "cancel" else "lost"
    output = work / f"predictions.{job.output_format}"
    digest, length = scorer.join(
        (store.iter_bytes(_part_key(job, i)) for i in range(chunks)), texts, contexts, output
    )
    if not heartbeat.held or not services.batch_heartbeat(job_id=job.pk, attempt=attempt):
        return "lost"
    key = f"{job.part_prefix}/predictions.{job.output_format}"
    store.put_file(key, output, move=True)
    finished = services.batch_finish(
        job_id=job.pk,
        attempt=attempt,
        output_key=key,
        output_sha256=digest,
        output_size_bytes=length,
    )
    if finished is None:
        return "lost"
    for i in range(chunks):  # the parts live on in the output
        store.delete(_part_key(job, i))
    return "succeeded"


def _part_key(job: Any, index: int) -> str:
    return f"{job.part_prefix}/parts/part-{index:05d}"
