from __future__ import annotations

from celery import shared_task

from apps.core.artifacts import get_store


@shared_task(name="datasets.delete_artifacts", acks_late=True, soft_time_limit=300, time_limit=360)
def delete_artifacts(keys: list[str]) -> int:
    """Remove the stored bytes of deleted dataset versions. Safe to repeat."""
    store = get_store()
    for key in keys:
        store.delete(key)
    return len(keys)
