"""Plumbing shared by the tenant-scoped dashboard pages.

``tenant_view`` is the dashboard's door, the counterpart of the API's ``TenantScopedMixin``:
login required, the tenant resolved from the URL only through ``resolve_tenant_access``
(404 for a non-member, never 403), and a ``require_role`` failure rendered as one 403 page
that names the role needed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Page, Paginator
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import render

from apps.tenants.models import Role
from apps.tenants.scoping import TenantAccess, resolve_tenant_access, role_error

P = ParamSpec("P")
M = TypeVar("M", bound=Model)

# How dashboard writes are recorded in the audit log (API writes say "token:<id>").
VIA = "session"


class RoleRequired(PermissionDenied):
    """The member is in the tenant but their role is too low for this action."""

    def __init__(self, access: TenantAccess, needed: Role) -> None:
        self.access = access
        self.message = role_error(access, needed)
        super().__init__(self.message)


def require_role(access: TenantAccess, needed: Role) -> None:
    if not access.allows(needed):
        raise RoleRequired(access, needed)


TenantPage = Callable[Concatenate[HttpRequest, TenantAccess, P], HttpResponse]


def tenant_view(view: TenantPage[P]) -> Callable[..., HttpResponse]:
    """Resolve ``<tenant>`` from the URL for a signed-in member and pass the access on."""
    return _tenant_door(view, staff_manages=False)


def member_management_view(view: TenantPage[P]) -> Callable[..., HttpResponse]:
    """``tenant_view`` for the members pages, where staff users manage any tenant's members
    (``access.as_staff``), as the members API lets them."""
    return _tenant_door(view, staff_manages=True)


def _tenant_door(view: TenantPage[P], *, staff_manages: bool) -> Callable[..., HttpResponse]:
    @wraps(view)
    def wrapper(
        request: HttpRequest, tenant: str, *args: P.args, **kwargs: P.kwargs
    ) -> HttpResponse:
        access = resolve_tenant_access(user=request.user, slug=tenant, staff_manages=staff_manages)
        try:
            return view(request, access, *args, **kwargs)
        except RoleRequired as exc:
            return render_tenant(
                request, exc.access, "403.html", {"exception": exc.message}, status=403
            )

    return login_required(wrapper)


def render_tenant(
    request: HttpRequest,
    access: TenantAccess,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    section: str = "",
    status: int = 200,
) -> HttpResponse:
    """Render a page inside a tenant: the layout highlights ``tenant`` and ``section``."""
    base = {
        "access": access,
        "tenant": access.tenant,
        "role": "staff" if access.as_staff else access.role.value,
        "nav_section": section,
    }
    return render(request, template, {**base, **(context or {})}, status=status)


def paginate(request: HttpRequest, queryset: QuerySet[M], per_page: int) -> Page[M]:
    # get_page() clamps a bad or out-of-range ?page= to a real page instead of raising.
    return Paginator(queryset, per_page).get_page(request.GET.get("page"))


def csrf_rejection(request: HttpRequest) -> HttpResponse | None:
    """Run the CSRF check for a view marked ``csrf_exempt``; a 403 response if it fails.

    Upload views parse the body themselves so that an over-size file becomes an inline
    form error; the middleware would read the body first and fail with a 500. The check
    still runs, once the body is parsed.
    """

    def unused(request: HttpRequest) -> HttpResponse:  # pragma: no cover - never called
        raise AssertionError

    return CsrfViewMiddleware(unused).process_view(request, None, (), {})  # type: ignore[arg-type]
