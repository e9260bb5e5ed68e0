from __future__ import annotations

from django.conf import settings
from django.db import models

from apps.core import ids


class AccessStatus(models.TextChoices):
    REQUESTED = "requested", "Requested"
    GRANTED = "granted", "Granted"
    DENIED = "denied", "Denied"
    REVOKED = "revoked", "Revoked"


class DataAccessRequest(models.Model):
    """A member's request to read one dataset (every version, or one) for a stated purpose;
    once a reviewer or admin who is not the requester grants it, it is the grant that lets
    the member's notebooks list and download that data, until it expires or is revoked."""

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_access_request_id, editable=False
    )
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="access_requests"
    )
    dataset = models.ForeignKey(
        "datasets.Dataset", on_delete=models.CASCADE, related_name="access_requests"
    )
    # Empty: every version of the dataset, those uploaded later included.
    dataset_version = models.ForeignKey(
        "datasets.DatasetVersion",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="access_requests",
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="access_requests"
    )
    purpose = models.TextField()
    status = models.CharField(
        max_length=16, choices=AccessStatus.choices, default=AccessStatus.REQUESTED, db_index=True
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    comment = models.TextField(blank=True, help_text="the reviewer's reason")
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "id"]
        indexes = [models.Index(fields=["tenant", "requested_by", "status"])]

    def __str__(self) -> str:
        version = self.dataset_version
        scope = f" v{version.number}" if version is not None else ""
        return f"access to {self.dataset.name}{scope} for {self.requested_by}"


class NotebookStatus(models.TextChoices):
    STARTING = "starting", "Starting"
    RUNNING = "running", "Running"
    STOPPED = "stopped", "Stopped"
    FAILED = "failed", "Failed"


ACTIVE = (NotebookStatus.STARTING, NotebookStatus.RUNNING)


class NotebookServer(models.Model):
    """One named JupyterHub server a member started inside a tenant: its environment holds
    an API token limited to the tenant (revoked when the server stops) and the dataset
    versions asked for. The hub owns the process; this row is the workbench's record."""

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_notebook_id, editable=False
    )
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notebook_servers"
    )
    hub_user = models.CharField(max_length=150)
    server_name = models.CharField(max_length=30, unique=True)
    status = models.CharField(
        max_length=16,
        choices=NotebookStatus.choices,
        default=NotebookStatus.STARTING,
        db_index=True,
    )
    datasets = models.ManyToManyField("datasets.DatasetVersion", blank=True, related_name="+")
    token = models.OneToOneField(
        "tenants.ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    url = models.CharField(max_length=300, blank=True, help_text="path on the hub, once running")
    stop_reason = models.CharField(max_length=32, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    last_activity = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "id"]
        indexes = [models.Index(fields=["user", "status"])]

    def __str__(self) -> str:
        return f"notebook {self.server_name} of {self.hub_user}"

    @property
    def active(self) -> bool:
        return self.status in ACTIVE
