"""Reads of evaluations that other reads and tasks build on."""

from __future__ import annotations

from apps.evaluation.models import EvalStatus, Evaluation


def cached_base_metrics(
    *,
    dataset_version_id: str,
    base_model: str,
    base_sha256: str,
    max_length: int,
    document_fields: str,
) -> Evaluation | None:
    """The latest succeeded evaluation of this retrieval set that measured the un-tuned base
    with these weights, max length and document text: the base's numbers depend on nothing
    else, so any model tuned from it reuses them rather than measure it again."""
    return (
        Evaluation.objects.filter(
            dataset_version_id=dataset_version_id,
            status=EvalStatus.SUCCEEDED,
            base_metrics__base_model=base_model,
            base_metrics__base_sha256=base_sha256,
            base_metrics__max_length=max_length,
            base_metrics__document_fields=document_fields,
        )
        .order_by("-finished_at", "-created_at")
        .first()
    )
