from __future__ import annotations

from django.db.models import QuerySet

from apps.audit.models import AuditEvent
from apps.tenants.models import Tenant


def audit_events_for_tenant(*, tenant: Tenant) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(tenant=tenant)
