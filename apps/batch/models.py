"""Batch predictions: a model version scores every row of a dataset version on a worker,
chunk by chunk, into one output file in the artifact store."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from apps.core import ids


class BatchStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE = (BatchStatus.QUEUED, BatchStatus.RUNNING)
FINISHED = (BatchStatus.SUCCEEDED, BatchStatus.FAILED, BatchStatus.CANCELLED)


class OutputFormat(models.TextChoices):
    JSONL = "jsonl", "JSON lines"
    CSV = "csv", "CSV"
    NPY = "npy", "NumPy .npy (vectors)"
    PARQUET = "parquet", "Parquet (vectors)"


class BatchPrediction(models.Model):
    """One model version over one dataset version's rows, bound to the artifact's sha256.

    Rows are scored ``chunk_rows`` at a time; each finished chunk is stored as its own part
    (``<output prefix>/part-NNNNN``) before ``chunks_done`` counts it, so a worker killed
    mid-way resumes at the first chunk not counted — no row scored twice into the output,
    none missing — and the parts are joined into the output once all are done. A running
    job belongs to the attempt whose lease (``heartbeat_at``) it renews, as runs do.
    """

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_batch_prediction_id, editable=False
    )
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="batch_predictions"
    )
    artifact_sha256 = models.CharField(max_length=64, help_text="the bytes that score")
    dataset_version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.PROTECT, related_name="batch_predictions"
    )
    model_kind = models.CharField(max_length=16, default="classifier", help_text="the model's")
    text_column = models.CharField(max_length=100, help_text="autocomplete: the prefixes")
    # Autocomplete: the customer messages the replies answer ("" none), the tokens and the
    # completions wanted per row. Embedding: the encoder (query or document) and the width.
    context_column = models.CharField(max_length=100, blank=True)
    max_tokens = models.PositiveSmallIntegerField(default=0)
    completions = models.PositiveSmallIntegerField(default=1)
    role = models.CharField(max_length=16, blank=True)
    dim = models.PositiveIntegerField(default=0, help_text="embedding: the vectors' width")
    output_format = models.CharField(
        max_length=8, choices=OutputFormat.choices, default=OutputFormat.JSONL
    )
    top_k = models.PositiveSmallIntegerField(default=3)
    chunk_rows = models.PositiveIntegerField(default=1000)
    status = models.CharField(
        max_length=16, choices=BatchStatus.choices, default=BatchStatus.QUEUED, db_index=True
    )
    rows_total = models.PositiveIntegerField(default=0)
    rows_done = models.PositiveIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    label_counts = models.JSONField(default=dict, help_text="predicted label -> rows")
    # Seconds spent scoring (every attempt's, summed) and the throughput over them.
    busy_seconds = models.FloatField(default=0.0)
    output_key = models.CharField(max_length=300, blank=True)
    output_sha256 = models.CharField(max_length=64, blank=True)
    output_size_bytes = models.BigIntegerField(default=0)
    preview = models.JSONField(default=list, help_text="the first output rows")
    error = models.TextField(blank=True)
    attempt = models.PositiveIntegerField(default=0)
    claimed_by = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True, help_text="when last sent")
    cancel_requested = models.BooleanField(default=False)
    registered_version = models.ForeignKey(
        "datasets.DatasetVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="the sample dataset version made of the output",
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
        return f"batch prediction {self.id}"

    @property
    def rows_per_s(self) -> float | None:
        return self.rows_done / self.busy_seconds if self.busy_seconds > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rows_per_s
        if rate is None or self.status != BatchStatus.RUNNING:
            return None
        return max(0.0, (self.rows_total - self.rows_done) / rate)

    @property
    def part_prefix(self) -> str:
        return f"batch/{self.tenant_id}/{self.pk}"
