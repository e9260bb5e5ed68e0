"""Embedding deployments' index builds, on the training queue (they run the model)."""

from __future__ import annotations

from celery import shared_task

from apps.deployments import indexing


@shared_task(name="deployments.build_index", acks_late=True, soft_time_limit=3600, time_limit=3900)
def build_index(deployment_id: str, staged: bool = False) -> str:
    """Safe to deliver twice: a second build of the same knowledge base stores the same
    vectors under a key of their own sha256 and records the same thing."""
    deployment = indexing.build(deployment_id=deployment_id, staged=staged)
    if deployment is None:
        return "skipped"
    return deployment.index_error or "built"
