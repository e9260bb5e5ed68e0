from __future__ import annotations

from typing import Any

from rest_framework import generics, serializers

from apps.audit.filters import AuditEventFilter
from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_events_for_tenant
from apps.core.api import KeysetPagination
from apps.tenants.scoping import TenantScopedMixin


class AuditEventOutputSerializer(serializers.ModelSerializer[AuditEvent]):
    actor = serializers.CharField(source="actor_name")

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "actor",
            "via",
            "verb",
            "object_type",
            "object_id",
            "object_repr",
            "before",
            "after",
            "request_id",
        ]


class AuditEventListApi(TenantScopedMixin, generics.ListAPIView[AuditEvent]):
    """A tenant's audit log, newest first. It grows without bound, so it pages by
    position (``next``/``previous`` carry a ``cursor``) and counts up to 10,000 rows
    (``count_exact`` false beyond)."""

    serializer_class = AuditEventOutputSerializer
    filterset_class = AuditEventFilter
    pagination_class = KeysetPagination

    def get_queryset(self) -> Any:
        return audit_events_for_tenant(tenant=self.tenant)
