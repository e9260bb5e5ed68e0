from __future__ import annotations

from django.conf import settings
from django.db import models

from apps.core import ids


class PromotionStatus(models.TextChoices):
    CHECKING = "checking", "Checking"
    GATES_FAILED = "gates_failed", "Gates failed"
    AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    DEPLOYING = "deploying", "Deploying"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


OPEN = (PromotionStatus.CHECKING, PromotionStatus.AWAITING_APPROVAL)
# Ended without a decision to make: its evaluations could not run (or its deployment failed).
BROKEN = (PromotionStatus.FAILED,)


class Target(models.TextChoices):
    STAGING = "staging", "Staging"
    PRODUCTION = "production", "Production"


class PromotionRequest(models.Model):
    """A request to move a model version to staging or production: gates, then four eyes.

    ``artifact_sha256`` is the digest of the bytes that were evaluated; an approval binds
    it, and anything downstream must refuse other bytes.
    """

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_promotion_id, editable=False
    )
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="promotions"
    )
    target = models.CharField(max_length=16, choices=Target.choices)
    status = models.CharField(
        max_length=24,
        choices=PromotionStatus.choices,
        default=PromotionStatus.CHECKING,
        db_index=True,
    )
    artifact_sha256 = models.CharField(max_length=64)
    evaluation_ids = models.JSONField(default=list)
    gate_results = models.JSONField(default=list)
    # The exact dataset versions the gates were checked on ({id, dataset, dataset_name,
    # kind, number, sha256, rows, shared, uploaded_by}), recorded when the gates are checked:
    # what the reviewer approves is measured against these yardsticks and no others.
    gate_dataset_versions = models.JSONField(default=list)
    champion = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    failure = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decision_comment = models.TextField(blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "id"]

    def __str__(self) -> str:
        return f"promotion {self.id} ({self.target})"
