"""Registry tasks: model health reports recomputed in the background."""

from __future__ import annotations

from celery import shared_task

from apps.registry import health


@shared_task(name="registry.refresh_health")
def refresh_health(kind: str, older_than_days: int, limit: int) -> None:
    health.refresh_report(kind=kind, older_than_days=older_than_days, limit=limit)


@shared_task(name="registry.refresh_stale_health")
def refresh_stale_health() -> int:
    return health.refresh_stale_reports()
