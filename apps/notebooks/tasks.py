"""Celery tasks for notebooks: thin; the hub is the source of truth for what runs."""

from __future__ import annotations

from celery import shared_task

from apps.notebooks import services


@shared_task(name="notebooks.sync", soft_time_limit=60, time_limit=90)
def sync_notebooks() -> int:
    # Servers the idle culler or the maximum age stopped lose their token here.
    return services.notebooks_sync()
