from __future__ import annotations

from django.db import models

from apps.core import ids


class ModelKind(models.TextChoices):
    CLASSIFIER = "classifier", "Classifier"
    EMBEDDING = "embedding", "Embedding"
    AUTOCOMPLETE = "autocomplete", "Autocomplete"


class Stage(models.TextChoices):
    NONE = "none", "None"
    STAGING = "staging", "Staging"
    PRODUCTION = "production", "Production"
    ARCHIVED = "archived", "Archived"


class ArtifactFormat(models.TextChoices):
    FULL = "full", "Full model"
    ADAPTER = "adapter", "Adapter on a shared base"


class RegisteredModel(models.Model):
    """A tenant's named model (e.g. ``support-intents``); its versions come from runs.

    Registered in MLflow as ``<tenant slug>.<name>``.
    """

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_registered_model_id, editable=False
    )
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="models")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=ModelKind.choices, default=ModelKind.CLASSIFIER)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="model_name_unique_in_tenant")
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def mlflow_name(self) -> str:
        return f"{self.tenant.slug}.{self.name}"


class ModelVersion(models.Model):
    """One trained model: an immutable artifact (a tar of safetensors weights, tokenizer and
    config) with its sha256, produced by exactly one training run.

    An adapter version's artifact holds only the tenant's LoRA adapter, head and labels; the
    base weights it adapts (``base_sha256``) are shared, and a replica holds them once."""

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_model_version_id, editable=False
    )
    registered_model = models.ForeignKey(
        RegisteredModel, on_delete=models.CASCADE, related_name="versions"
    )
    number = models.PositiveIntegerField()
    run = models.OneToOneField(
        "training.TrainingRun", on_delete=models.PROTECT, related_name="model_version"
    )
    artifact_key = models.CharField(max_length=300)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    memory_bytes = models.BigIntegerField(
        help_text="measured by loading it and running a batch; an adapter's own bytes only"
    )
    format = models.CharField(
        max_length=16, choices=ArtifactFormat.choices, default=ArtifactFormat.FULL
    )
    base_sha256 = models.CharField(
        max_length=64, blank=True, help_text="adapters: the sha256 of the shared base's weights"
    )
    base_memory_bytes = models.BigIntegerField(
        default=0, help_text="adapters: the shared base's bytes, held once per replica"
    )
    predictions_key = models.CharField(max_length=300, help_text="validation predictions, JSONL")
    labels = models.JSONField(help_text="class index -> label")
    metrics = models.JSONField(default=dict)
    stage = models.CharField(max_length=16, choices=Stage.choices, default=Stage.NONE)
    aliases = models.JSONField(default=list)
    mlflow_version = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["registered_model", "-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["registered_model", "number"], name="model_version_number_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.registered_model.name} v{self.number}"


class HealthReport(models.Model):
    """Model health across tenants as last computed, for one query (kind, age bound, list
    length). Computing it reads every production version and recent promotion (a second at
    30,000 models), so pages and the API serve the last report with its age, and a stale
    one is recomputed in the background (``apps.registry.health.health_report``)."""

    kind = models.CharField(max_length=16, choices=ModelKind.choices)
    older_than_days = models.PositiveIntegerField()
    limit = models.PositiveIntegerField()
    report = models.JSONField()
    computed_at = models.DateTimeField()
    took_ms = models.FloatField(help_text="how long computing it took")
    # Set when a background refresh is sent: one at a time per report.
    refresh_sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "older_than_days", "limit"], name="one_health_report_per_query"
            )
        ]

    def __str__(self) -> str:
        return f"health {self.kind} ({self.older_than_days} d, {self.limit}) at {self.computed_at}"
