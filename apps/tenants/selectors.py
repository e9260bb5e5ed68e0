from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from apps.tenants.models import ApiToken, Membership, Tenant


def tenants_for_user(*, user: Any, token: ApiToken | None = None) -> QuerySet[Tenant]:
    tenants = Tenant.objects.filter(memberships__user=user)
    if token is not None and token.tenant_id is not None:
        tenants = tenants.filter(pk=token.tenant_id)
    return tenants.distinct().order_by("slug")


def memberships_for_user(*, user: Any) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__slug")


def members_of(*, tenant: Tenant) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(tenant=tenant).select_related("user").order_by("user__username")
    )


def tokens_of(*, user: Any) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).select_related("tenant").order_by("-created_at")
