"""Serving pools, deployments of model versions onto them, warm-ups and fleet alerts.

A deployment's life: pending -> loading -> warm | failed; warm -> retired (replaced by a
newer deployment, or retired by hand); warm <-> degraded (the fleet stopped serving it; it
is warm again only after a verified warm-up). The workbench holds the desired state of the
fleet here; the fleet controller (apps.deployments.controller) alone pushes it to the
serving backend, and publishes what the fleet reports back (routes, status) on the pools.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from apps.core import ids


class Environment(models.TextChoices):
    STAGING = "staging", "Staging"
    PRODUCTION = "production", "Production"


class EmbeddingRole(models.TextChoices):
    """Which encoder of an embedding model embeds a text (the embed API's ``role``)."""

    QUERY = "query", "Query"
    DOCUMENT = "document", "Document"


class CompletionStrategy(models.TextChoices):
    """How an autocomplete model decodes (the complete API's ``strategy``; the names are
    ``worker.autocomplete_text.STRATEGIES``)."""

    GREEDY = "greedy", "Greedy (deterministic)"
    BEAM = "beam", "Beam search"
    TOP_K = "top_k", "Top-k sampling"


class DeploymentStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    LOADING = "loading", "Loading"
    WARM = "warm", "Warm"
    DEGRADED = "degraded", "Degraded"
    FAILED = "failed", "Failed"
    RETIRED = "retired", "Retired"


# Statuses whose model the fleet must hold.
ACTIVE = (
    DeploymentStatus.PENDING,
    DeploymentStatus.LOADING,
    DeploymentStatus.WARM,
    DeploymentStatus.DEGRADED,
)
# Statuses that answer predictions (a degraded one is tried: it may be back before the
# controller notices, and a failed try is a quick 503).
SERVING = (DeploymentStatus.WARM, DeploymentStatus.DEGRADED)


class ServingPool(models.Model):
    """The fleet's pool for one model kind, with its capacity settings and the placement of
    its pinned models that was last pushed to the backend."""

    kind = models.CharField(primary_key=True, max_length=16)
    replica_memory_bytes = models.BigIntegerField()
    max_sets = models.PositiveIntegerField()
    tail_memory_bytes = models.BigIntegerField()
    min_replicas = models.PositiveIntegerField()
    max_replicas = models.PositiveIntegerField()
    # model version id -> replica set index, as last applied.
    placement = models.JSONField(default=dict)
    # replica id -> started_at of the replicas seen by the last fleet check, to notice
    # restarts (a replica that came back must be re-warmed).
    replicas_seen = models.JSONField(default=dict)
    applied_at = models.DateTimeField(null=True, blank=True)
    # What the fleet controller last saw and published: the routing table web and worker
    # processes send predicts by (model id -> deployment and sha256, deployment -> replica
    # endpoints with their secrets: never shown), and the pool's public status.
    routes = models.JSONField(default=dict)
    observed = models.JSONField(default=dict)
    observed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"pool {self.kind}"


class FleetLease(models.Model):
    """The fleet controller's lease (one row): the holder alone talks to the serving
    backend, until its lease expires without renewal. ``generation`` is bumped by every
    change of the desired state so the controller acts at once instead of at its next
    periodic pass."""

    name = models.CharField(primary_key=True, max_length=32, default="fleet")
    holder = models.CharField(max_length=200, blank=True)
    acquired_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    generation = models.BigIntegerField(default=0)
    last_pass_at = models.DateTimeField(null=True, blank=True)
    last_pass_ms = models.FloatField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"lease {self.name} held by {self.holder or 'nobody'}"


class Deployment(models.Model):
    """One model version made live (or being made live) in one environment of its tenant.

    Bound to the artifact's sha256 approved by the promotion: the fleet refuses other bytes.
    ``standby``: a deployment replaced by a newer one keeps its model loaded in the pool's
    long-tail tier so that a rollback is a warm-up, not a cold load.
    """

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_deployment_id, editable=False
    )
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="deployments"
    )
    environment = models.CharField(max_length=16, choices=Environment.choices)
    status = models.CharField(
        max_length=16,
        choices=DeploymentStatus.choices,
        default=DeploymentStatus.PENDING,
        db_index=True,
    )
    artifact_sha256 = models.CharField(max_length=64)
    promotion = models.ForeignKey(
        "promotions.PromotionRequest",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="deployments",
    )
    replaces = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    is_rollback = models.BooleanField(default=False)
    standby = models.BooleanField(default=False)
    replica_set = models.IntegerField(null=True, blank=True)
    failure = models.TextField(blank=True)
    # When its current load attempt began (the controller retries one without progress).
    claimed_at = models.DateTimeField(null=True, blank=True)
    load_attempts = models.PositiveIntegerField(default=0)
    # A warm-up asked for by a person, not yet run by the controller.
    warmup_requested_at = models.DateTimeField(null=True, blank=True)
    degraded_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    warm_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    last_warmup_at = models.DateTimeField(null=True, blank=True)
    last_warmup_ms = models.FloatField(null=True, blank=True)
    # Embedding deployments: the knowledge base searched (``corpus``, or else the model's
    # training dataset version) and its index, an artifact bound by sha256 (built by the
    # ``deployments.build_index`` task; the deployment is claimed once it exists). A reindex
    # builds a staged index the fleet loads beside the served one; after a verified
    # warm-up it becomes the index (blue/green). Empty for classifiers.
    corpus = models.ForeignKey(
        "datasets.DatasetVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    index_key = models.CharField(max_length=300, blank=True, default="")
    index_sha256 = models.CharField(max_length=64, blank=True, default="")
    index_size_bytes = models.BigIntegerField(default=0)
    index_documents = models.PositiveIntegerField(default=0)
    index_dataset_version = models.ForeignKey(
        "datasets.DatasetVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    staged_dataset_version = models.ForeignKey(
        "datasets.DatasetVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    staged_index_key = models.CharField(max_length=300, blank=True, default="")
    staged_index_sha256 = models.CharField(max_length=64, blank=True, default="")
    staged_index_size_bytes = models.BigIntegerField(default=0)
    staged_index_documents = models.PositiveIntegerField(default=0)
    # When the reindex now in progress was asked for (its build is lost past a bound).
    staged_requested_at = models.DateTimeField(null=True, blank=True)
    # Why the last index build or reindex failed ("" when it did not).
    index_error = models.TextField(blank=True, default="")
    reindexed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "id"]
        constraints = [
            # At most one deployment serves a model's environment at a time.
            models.UniqueConstraint(
                fields=["tenant", "model_version", "environment"],
                condition=models.Q(status__in=["pending", "loading", "warm", "degraded"]),
                name="one_active_deployment_per_version_env",
            )
        ]

    def __str__(self) -> str:
        return f"deployment {self.id}"

    @property
    def pinned(self) -> bool:
        return self.environment == Environment.PRODUCTION and self.status in ACTIVE


class WarmupTrigger(models.TextChoices):
    DEPLOY = "deploy", "Deploy"
    SCHEDULE = "schedule", "Schedule"
    REPLICA_RESTART = "replica_restart", "Replica restart"
    MANUAL = "manual", "Manual"
    RECOVERY = "recovery", "Recovery"
    REINDEX = "reindex", "Reindex"


class Warmup(models.Model):
    """One warm-up: golden-set samples sent through the fleet, compared with the
    predictions the evaluation recorded, timed against the policy's latency budget."""

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_warmup_id, editable=False
    )
    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="warmups")
    trigger = models.CharField(max_length=20, choices=WarmupTrigger.choices)
    ok = models.BooleanField(default=False)
    samples = models.PositiveIntegerField(default=0)
    mismatches = models.JSONField(default=list)
    latency_ms_p50 = models.FloatField(null=True, blank=True)
    latency_ms_max = models.FloatField(null=True, blank=True)
    latency_budget_ms = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at", "id"]

    def __str__(self) -> str:
        return f"warm-up {self.id}"


class AlertKind(models.TextChoices):
    WARMUP_FAILED = "warmup_failed", "Warm-up failed"
    REPLICA_RESTARTING = "replica_restarting", "Replica keeps restarting"
    LOAD_FAILING = "load_failing", "Model keeps failing to load"
    NOT_SERVING = "not_serving", "Model is not being served"


class FleetAlert(models.Model):
    """Something about a tenant's live model that a person must look at; open until
    resolved (the next good warm-up resolves a warm-up alert)."""

    id = models.CharField(primary_key=True, max_length=32, default=ids.new_alert_id, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    deployment = models.ForeignKey(
        Deployment, null=True, on_delete=models.CASCADE, related_name="alerts"
    )
    kind = models.CharField(max_length=24, choices=AlertKind.choices)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "id"]

    def __str__(self) -> str:
        return f"alert {self.kind} {self.id}"
