from __future__ import annotations

from django.conf import settings
from django.db import models

from apps.core import ids


class RunStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


FINISHED = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


class Sweep(models.Model):
    """A grid of hyper-parameters: one run per point; the best run by ``metric``."""

    id = models.CharField(primary_key=True, max_length=32, default=ids.new_sweep_id, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="sweeps")
    dataset_version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.PROTECT, related_name="+"
    )
    base_model = models.CharField(max_length=50)
    grid = models.JSONField()
    base_params = models.JSONField(default=dict)
    metric = models.CharField(max_length=50)
    goal = models.CharField(max_length=8, choices=[("max", "max"), ("min", "min")])
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"sweep {self.id}"


class TrainingRun(models.Model):
    """One training job: queued, claimed by one worker at a time, resumable from its last
    checkpoint, ending in exactly one model version when it succeeds.

    ``attempt`` and ``claimed_by`` fence workers: a worker whose claim was taken over (its
    heartbeat went stale and the run was re-queued) fails its next conditional update and
    stops; the artifacts an attempt stores are under keys that carry its number, and it
    checks that it still holds the run before each upload, registration and MLflow write.
    """

    id = models.CharField(primary_key=True, max_length=32, default=ids.new_run_id, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="runs")
    dataset_version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.PROTECT, related_name="runs"
    )
    validation_version = models.ForeignKey(
        "datasets.DatasetVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    model_name = models.CharField(max_length=100)
    base_model = models.CharField(max_length=50)
    params = models.JSONField(help_text="the full resolved training config")
    status = models.CharField(
        max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED, db_index=True
    )
    progress = models.JSONField(default=dict)
    metrics = models.JSONField(default=dict)
    stop_reason = models.CharField(max_length=32, blank=True)
    stop_detail = models.TextField(blank=True)
    error = models.TextField(blank=True)
    log_tail = models.JSONField(default=list)
    # An autocomplete run's held-out prefixes with its best model's greedy completions
    # ({"context", "prefix", "completion", "reference", "next_word", "matched", "score"}),
    # for the run page; empty for other runs.
    samples = models.JSONField(default=list, blank=True)
    environment = models.JSONField(default=dict, help_text="commit, library versions, device")
    dispatched_at = models.DateTimeField(null=True, blank=True)
    # Times the run was sent to the training queue again because no worker took it within
    # TRAINING_DISPATCH_TIMEOUT_SECONDS (its message lost); a claim sets it back to 0.
    redispatches = models.PositiveIntegerField(default=0)
    attempt = models.PositiveIntegerField(default=0)
    claimed_by = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    checkpoint_key = models.CharField(max_length=300, blank=True)
    checkpoint_step = models.PositiveIntegerField(null=True, blank=True)
    mlflow_run_id = models.CharField(max_length=64, blank=True)
    sweep = models.ForeignKey(
        Sweep, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    rerun_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reruns"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "id"]
        indexes = [models.Index(fields=["tenant", "status", "created_at"])]

    def __str__(self) -> str:
        return f"run {self.id}"


class RunMetric(models.Model):
    """One point of a run's metric time series (train_loss per step, val_* per epoch)."""

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="metric_points")
    name = models.CharField(max_length=50)
    step = models.PositiveIntegerField()
    epoch = models.FloatField(null=True, blank=True)
    value = models.FloatField()

    class Meta:
        ordering = ["run", "name", "step"]
        constraints = [
            # A resumed run re-reports steps it reported before the crash: keep one point.
            models.UniqueConstraint(fields=["run", "name", "step"], name="one_point_per_step")
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.step}={self.value}"
