import logging
from typing import Any

from django.apps import AppConfig

log = logging.getLogger(__name__)


def _resume_on_start(**_: Any) -> None:
    """A worker that starts looks for jobs whose holder was a process of this host that is
    gone (the worker it replaces), so they resume now rather than at the next sweep."""
    from apps.batch.tasks import requeue_stale_batch

    try:
        requeue_stale_batch.delay()
    except Exception:  # the broker is down: beat's sweep does it later
        log.warning("could not send the batch reaper at start")


class BatchConfig(AppConfig):
    name = "apps.batch"
    label = "batch"
    verbose_name = "Batch predictions"

    def ready(self) -> None:
        from celery import signals

        signals.worker_ready.connect(_resume_on_start, weak=False)
