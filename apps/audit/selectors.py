from __future__ import annotations

from django.db.models import QuerySet

from apps.audit.models import AuditEvent


def audit_events_for_tenant(*, tenant: object) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(tenant=tenant)
