"""The one place that decides which tenant a request may see, and with which role.

API views and dashboard views both resolve ``{tenant}`` from the URL through
``resolve_tenant_access``. A tenant the caller is not a member of (or that their token is
not limited to) does not exist for them: 404, never 403, so its existence does not leak.

One exception, named by the view: pages and endpoints that manage a tenant's members let
staff (platform) users in as admins of any tenant, so that they can onboard a customer
whose tenant has no admin yet. Their access says ``as_staff`` and their changes are
audited so; every other route keeps staff out of tenants they are not members of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.http import Http404
from rest_framework import exceptions
from rest_framework.request import Request

from apps.core import rawsql
from apps.tenants.models import ROLE_RANK, ApiToken, Membership, Role, Tenant


@dataclass(frozen=True)
class TenantAccess:
    tenant: Tenant
    membership: Membership | None  # None: a staff user who is no member (as_staff)
    as_staff: bool = False

    @property
    def role(self) -> Role:
        if self.as_staff or self.membership is None:
            return Role.ADMIN
        return Role(self.membership.role)

    def allows(self, role: Role) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def resolve_tenant_access(
    *, user: Any, slug: str, token: ApiToken | None = None, staff_manages: bool = False
) -> TenantAccess:
    """The caller's access to tenant ``slug``; with ``staff_manages`` (member management
    only) a staff user who is not an admin of it acts as one, marked ``as_staff``."""
    if user is None or not user.is_authenticated:
        raise Http404("No such tenant.")
    if token is not None and token.tenant is not None and token.tenant.slug != slug:
        raise Http404("No such tenant.")
    membership = membership_by_slug(user_id=user.pk, slug=slug)
    if staff_manages and user.is_staff and (membership is None or membership.role != Role.ADMIN):
        tenant = membership.tenant if membership is not None else _tenant_by_slug(slug)
        if tenant is not None:
            return TenantAccess(tenant=tenant, membership=membership, as_staff=True)
    if membership is None:
        raise Http404("No such tenant.")
    return TenantAccess(tenant=membership.tenant, membership=membership)


def _tenant_by_slug(slug: str) -> Tenant | None:
    return Tenant.objects.filter(slug=slug).first()


def membership_by_slug(*, user_id: Any, slug: str) -> Membership | None:
    """The user's membership of the tenant ``slug`` with its tenant, in one query (every
    tenant-scoped request makes it)."""
    membership = rawsql.Part(Membership, "m")
    tenant = rawsql.Part(Tenant, "n", attach=(0, "tenant"))
    rows = rawsql.fetch(
        [membership, tenant],
        f"FROM {rawsql.table(Membership)} m {rawsql.join(tenant, membership, 'tenant')} "
        f"WHERE {rawsql.equals(membership, 'user')} AND {rawsql.equals(tenant, 'slug')}",
        [user_id, slug],
    )
    return rows[0][0] if rows else None  # type: ignore[return-value]


def role_error(access: TenantAccess, needed: Role) -> str:
    return (
        f"This action needs the '{needed.value}' role (or higher) in tenant "
        f"'{access.tenant.slug}'; you have '{access.role.value}'."
    )


class TenantScopedMixin:
    """For API views under ``/api/v1/tenants/{tenant}/``: sets ``self.access``.

    ``required_roles`` maps HTTP methods to the least role allowed; anything not named
    needs a scientist for writes and a viewer for reads.
    """

    required_roles: dict[str, Role] = {}
    # Member management only: staff users act as admins of any tenant (see above).
    staff_manages = False
    access: TenantAccess

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        token = request.auth if isinstance(request.auth, ApiToken) else None
        try:
            self.access = resolve_tenant_access(
                user=request.user,
                slug=kwargs["tenant"],
                token=token,
                staff_manages=self.staff_manages,
            )
        except Http404 as exc:
            raise exceptions.NotFound("No such tenant.") from exc
        method = request.method or "GET"
        default = Role.VIEWER if method in ("GET", "HEAD", "OPTIONS") else Role.SCIENTIST
        needed = self.required_roles.get(method, default)
        if not self.access.allows(needed):
            raise exceptions.PermissionDenied(role_error(self.access, needed))

    @property
    def tenant(self) -> Tenant:
        if getattr(self, "swagger_fake_view", False):  # OpenAPI generation: no request tenant
            return None  # type: ignore[return-value]
        return self.access.tenant

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()  # type: ignore[misc]
        if hasattr(self, "access"):
            context["tenant"] = self.access.tenant
        return context
