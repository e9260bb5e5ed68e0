from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Count, OuterRef, Prefetch, QuerySet, Subquery

from apps.tenants.models import ApiToken, Membership, Tenant


def tenants_for_user(*, user: Any, token: ApiToken | None = None) -> QuerySet[Tenant]:
    # A semi-join (no DISTINCT over the memberships join): a member of 10,000 tenants
    # pages through them as fast as a member of one.
    tenants = Tenant.objects.filter(pk__in=Membership.objects.filter(user=user).values("tenant_id"))
    if token is not None and token.tenant_id is not None:
        tenants = tenants.filter(pk=token.tenant_id)
    return tenants.order_by("slug")


def with_caller_role(tenants: QuerySet[Tenant], *, user: Any) -> QuerySet[Tenant]:
    """``tenants``, each with ``caller_role``: ``user``'s role in it, or None."""
    role = Membership.objects.filter(tenant=OuterRef("pk"), user=user).values("role")[:1]
    return tenants.annotate(caller_role=Subquery(role))


def memberships_for_user(*, user: Any) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__slug")


def members_of(*, tenant: Tenant) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(tenant=tenant).select_related("user").order_by("user__username")
    )


def tokens_of(*, user: Any) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).select_related("tenant").order_by("-created_at")


def users_all() -> QuerySet[Any]:
    """Every account, for staff, with its memberships (one query more, not one per user)."""
    return (
        get_user_model()
        .objects.prefetch_related(
            Prefetch("memberships", queryset=Membership.objects.select_related("tenant"))
        )
        .order_by("username")
    )


def tenants_all() -> QuerySet[Tenant]:
    """Every tenant, for staff, with its number of members."""
    return Tenant.objects.annotate(member_count=Count("memberships")).order_by("slug")


def active_users_named(usernames: Sequence[str]) -> tuple[list[Any], str]:
    """The active users with these names in the order given (each once), and the error
    message naming every name that is unknown or inactive ("" when all were found)."""
    found = {
        u.get_username(): u
        for u in get_user_model().objects.filter(username__in=list(usernames), is_active=True)
    }
    unknown = [name for name in usernames if name not in found]
    message = (
        "No active user named " + ", ".join(f"'{name}'" for name in unknown) + "."
        if unknown
        else ""
    )
    return [found[name] for name in dict.fromkeys(usernames) if name in found], message
