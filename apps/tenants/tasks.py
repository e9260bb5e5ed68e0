"""Celery tasks for user accounts: thin; load the rows, call the owning service."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.contrib.auth import get_user_model

from apps.core.errors import DomainError, ServiceUnavailable
from apps.notebooks.models import ACTIVE, NotebookServer
from apps.notebooks.services import notebook_stop

log = logging.getLogger(__name__)


@shared_task(
    name="tenants.stop_user_notebooks",
    bind=True,
    max_retries=20,
    soft_time_limit=240,
    time_limit=300,
)
def stop_user_notebooks(self: Any, user_id: int, actor_id: int | None = None) -> int:
    """Stop every notebook server of a deactivated user through the notebooks app's own
    ``notebook_stop``; safe to repeat (a stopped server is a no-op). While JupyterHub does
    not answer, retried every 30 s: the server's token is revoked already, but its
    process must not keep running."""
    actor = get_user_model().objects.filter(pk=actor_id).first() if actor_id else None
    stopped = 0
    for server in NotebookServer.objects.filter(user_id=user_id, status__in=ACTIVE):
        try:
            notebook_stop(actor=actor, server=server, via="user.deactivate")
        except ServiceUnavailable as exc:
            raise self.retry(exc=exc, countdown=30) from exc
        except DomainError:
            log.warning("jupyterhub refused to stop a server", extra={"server": server.pk})
            continue
        stopped += 1
    return stopped
