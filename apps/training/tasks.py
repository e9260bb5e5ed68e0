"""Celery tasks for training: thin, idempotent, fenced by the run's claim."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from apps.training import runner, services


@shared_task(
    name="training.execute_run",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.TRAINING_SOFT_TIME_LIMIT,
    time_limit=settings.TRAINING_SOFT_TIME_LIMIT + 600,
)
def execute_run(run_id: str) -> str:
    # Safe to deliver twice: run_claim lets exactly one worker take a queued run.
    return runner.execute(run_id)


@shared_task(name="training.dispatch", soft_time_limit=60, time_limit=90)
def dispatch_runs() -> list[str]:
    return services.runs_dispatch()


@shared_task(name="training.requeue_stale", soft_time_limit=60, time_limit=90)
def requeue_stale() -> list[str]:
    requeued = services.runs_requeue_stale()
    if requeued:
        services.runs_dispatch()
    return requeued


@shared_task(name="training.redispatch_lost", soft_time_limit=60, time_limit=90)
def redispatch_lost() -> list[str]:
    # A run whose dispatch message was lost holds its tenant's slot until this sends it again.
    return services.runs_redispatch_lost()
