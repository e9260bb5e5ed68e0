from __future__ import annotations

from django.conf import settings
from django.db import models

from apps.core import ids


class EvalStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class Evaluation(models.Model):
    """One model version measured on one dataset version, bound to the artifact's sha256.

    A running evaluation belongs to the worker whose ``attempt`` it names while that worker
    renews ``heartbeat_at``; once the heartbeat is stale the reaper re-queues it (a new claim
    starts the next attempt) and the old worker's writes find it no longer theirs.
    """

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_evaluation_id, editable=False
    )
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="evaluations"
    )
    dataset_version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.PROTECT, related_name="evaluations"
    )
    status = models.CharField(
        max_length=16, choices=EvalStatus.choices, default=EvalStatus.QUEUED, db_index=True
    )
    artifact_sha256 = models.CharField(max_length=64, help_text="the bytes that were evaluated")
    max_rows = models.PositiveIntegerField(null=True, blank=True, help_text="sample size")
    metrics = models.JSONField(default=dict)
    # The first rows' inputs and predictions ({text, label, predicted, score}): what a
    # deployment's warm-up sends through the fleet and must get back unchanged.
    samples = models.JSONField(default=list)
    # An embedding model's evaluation also measures the un-tuned base it was trained from,
    # the same way on the same set ({recall_at_1, ..., recall_curve, base_model,
    # base_sha256, max_length, reused_from}): the champion when there is none, and the
    # yardstick the review page shows beside the version. {} for a classifier.
    base_metrics = models.JSONField(default=dict)
    # The queries the version ranks wrong (its first result not relevant), the first
    # ``tasks.MAX_WRONG_QUERIES`` in file order: {query, document_id, relevant,
    # first_hit, ranked: [{document_id, title, score}]}. Only of the tenant's own sets.
    wrong_queries = models.JSONField(default=list)
    error = models.TextField(blank=True)
    attempt = models.PositiveIntegerField(default=0)
    claimed_by = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # When the task was last sent: a queued evaluation no worker claimed long after it, with
    # the queue empty, lost its message and is sent again.
    queued_at = models.DateTimeField(null=True, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # When its last attempt was claimed by a worker.
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "id"]

    def __str__(self) -> str:
        return f"evaluation {self.id}"


class PromotionPolicy(models.Model):
    """What a tenant's model of one kind must pass before it moves up.

    ``gates``: ``[{"metric": "macro_f1", "op": ">=", "value": 0.8, "dataset": <id or null>}]``
    — a gate without a dataset applies to every evaluated dataset.
    """

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    model_kind = models.CharField(max_length=16)
    gates = models.JSONField(default=list)
    max_regression_vs_champion = models.FloatField(null=True, blank=True)
    latency_budget_ms = models.FloatField(null=True, blank=True)
    require_staging_before_production = models.BooleanField(default=False)
    # Four eyes extend to the model's trainer: by default the user who launched the training
    # run of a version may not approve its promotion (they chose its data and recipe).
    trainer_may_approve = models.BooleanField(default=False)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "model_kind"], name="one_policy_per_kind")
        ]

    def __str__(self) -> str:
        return f"policy {self.tenant_id}/{self.model_kind}"
