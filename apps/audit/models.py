from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models

from apps.core import ids


class AuditEvent(models.Model):
    """One state change: who did what to which object, with its state before and after.

    Rows are append-only: ``save()`` refuses updates, ``delete()`` refuses, and a database
    trigger (see migration 0002) refuses UPDATE and DELETE from any client.
    """

    id = models.CharField(primary_key=True, max_length=32, default=ids.new_event_id, editable=False)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    tenant = models.ForeignKey(
        "tenants.Tenant",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    actor_name = models.CharField(max_length=150, blank=True)
    via = models.CharField(max_length=32, blank=True, help_text="session, token:<id>, task, cli")
    verb = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64, db_index=True)
    object_id = models.CharField(max_length=64, db_index=True)
    object_repr = models.CharField(max_length=200, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # The log's keyset order, whole and by verb (apps.core.keyset).
            models.Index(fields=["tenant", "-created_at", "-id"], name="audit_tenant_keyset"),
            models.Index(
                fields=["tenant", "verb", "-created_at", "-id"], name="audit_tenant_verb_keyset"
            ),
        ]

    def __str__(self) -> str:
        who = self.actor_name or "-"
        when = f"{self.created_at:%Y-%m-%d %H:%M:%S}"
        return f"{when} {who} {self.verb} {self.object_type}:{self.object_id}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise RuntimeError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("audit events are append-only")
