"""The dashboard's audit page: a tenant's events, filtered like the audit API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_http_methods

from apps.audit.filters import AuditEventFilter
from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_events_for_tenant
from apps.core.errors import InvalidInput
from apps.core.keyset import keyset_page
from apps.tenants.dashboard import render_tenant, tenant_view
from apps.tenants.scoping import TenantAccess

EVENTS_PER_PAGE = 50
VERB_SAMPLE = 2000
SHORT_JSON = 160


@dataclass(frozen=True)
class EventRow:
    event: AuditEvent
    before: str
    after: str


def compact_json(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str)


@require_http_methods(["GET", "HEAD"])
@tenant_view
def audit_page(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    events = audit_events_for_tenant(tenant=access.tenant)
    filterset = AuditEventFilter(request.GET or None, queryset=events)
    try:
        page = keyset_page(
            filterset.qs,
            size=EVENTS_PER_PAGE,
            cursor=request.GET.get("cursor"),
            page=request.GET.get("page"),
        )
    except InvalidInput:  # a stale or hand-made cursor, a page past the cap: the newest
        page = keyset_page(filterset.qs, size=EVENTS_PER_PAGE)
    rows = [EventRow(e, compact_json(e.before), compact_json(e.after)) for e in page.rows]
    # The verbs to suggest: those of the newest events (a tenant's whole log, a million
    # rows, is not scanned for them on every visit).
    newest = events.order_by("-created_at").values_list("verb", flat=True)[:VERB_SAMPLE]
    verbs = sorted(set(newest))
    return render_tenant(
        request,
        access,
        "audit/list.html",
        {
            "filter": filterset,
            "page": page,
            "rows": rows,
            "verbs": verbs,
            "short_json": SHORT_JSON,
        },
        section="audit-page",
    )
