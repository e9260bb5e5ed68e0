"""Retraining campaigns: one model retrained, evaluated and put up for promotion in many
tenants at once.

A campaign names which tenants (all of them, a list, or a domain), the model, a recipe (a
base model with its params, or each tenant's last successful configuration), a promotion
target and a trigger (now, every ``interval_seconds``, or a tenant's new training version).
Each firing of the trigger in one tenant is one ``CampaignItem``, unique per (campaign,
tenant, trigger key): a redelivered task or a restarted process finds the item and never
launches a second run for it. An item moves ``pending -> training -> checking -> review``
(its promotion request passed the gates; the request's own status says the rest) or ends
``skipped`` with a reason, or ``cancelled``.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from apps.core import ids


class Trigger(models.TextChoices):
    NOW = "now", "Now"
    SCHEDULE = "schedule", "On a schedule"
    NEW_DATA = "new_data", "When a tenant's training data gets a new version"


class CampaignStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    FINISHED = "finished", "Finished"
    CANCELLED = "cancelled", "Cancelled"


class ItemState(models.TextChoices):
    PENDING = "pending", "Pending"
    TRAINING = "training", "Training"
    CHECKING = "checking", "Checking gates"
    REVIEW = "review", "Up for review"
    SKIPPED = "skipped", "Skipped"
    CANCELLED = "cancelled", "Cancelled"


# Items the campaign still moves on (the rest are a reviewer's, or ended).
MOVING = (ItemState.PENDING, ItemState.TRAINING, ItemState.CHECKING)


class SkipReason(models.TextChoices):
    NO_DATA = "no_data", "No training data"
    TOO_FEW_ROWS = "too_few_rows", "Too few rows"
    NO_PREVIOUS_RUN = "no_previous_run", "No earlier successful run to repeat"
    LAUNCH_REFUSED = "launch_refused", "The run was refused"
    RUN_FAILED = "run_failed", "The run failed"
    GATES_FAILED = "gates_failed", "The gates failed"
    PROMOTION_FAILED = "promotion_failed", "The promotion could not be checked"


class Campaign(models.Model):
    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_campaign_id, editable=False
    )
    name = models.CharField(max_length=100)
    model_name = models.CharField(max_length=100)
    # Each tenant's training dataset of this name (its latest version) is trained on.
    dataset_name = models.CharField(max_length=200)
    # {"tenants": "all"} | {"tenants": [slug, ...]} | {"domain": "retail"}
    selection = models.JSONField()
    # {"base_model": ..., "params": {...}} (params resolved) | {"last": true}
    recipe = models.JSONField()
    target = models.CharField(max_length=16)
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.NOW)
    interval_seconds = models.PositiveIntegerField(null=True, blank=True)
    weight = models.PositiveSmallIntegerField(
        default=1, help_text="its share of the training budget against other campaigns"
    )
    status = models.CharField(
        max_length=16, choices=CampaignStatus.choices, default=CampaignStatus.ACTIVE,
        db_index=True,
    )  # fmt: skip
    rounds = models.PositiveIntegerField(default=0)
    next_round_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "id"]

    def __str__(self) -> str:
        return f"campaign {self.id}"


class CampaignItem(models.Model):
    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_campaign_item_id, editable=False
    )
    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="items")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    # "now", "round-<n>", or the new dataset version's id: one item per firing per tenant.
    trigger_key = models.CharField(max_length=64)
    state = models.CharField(
        max_length=16, choices=ItemState.choices, default=ItemState.PENDING, db_index=True
    )
    skip_reason = models.CharField(max_length=24, choices=SkipReason.choices, blank=True)
    detail = models.TextField(blank=True)
    dataset_version = models.ForeignKey(
        "datasets.DatasetVersion", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )  # fmt: skip
    run = models.OneToOneField(
        "training.TrainingRun", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="campaign_item",
    )  # fmt: skip
    promotion = models.OneToOneField(
        "promotions.PromotionRequest", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="campaign_item",
    )  # fmt: skip
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["campaign", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["campaign", "tenant", "trigger_key"], name="campaign_item_once"
            )
        ]
        indexes = [models.Index(fields=["campaign", "state"])]

    def __str__(self) -> str:
        return f"campaign item {self.id}"
