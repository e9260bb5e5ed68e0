from __future__ import annotations

from functools import cached_property
from typing import Any

from django.db.models import Exists, OuterRef
from django.http import HttpRequest
from django.urls import reverse

from apps.tenants.models import Membership, OrgRoleGrant
from apps.tenants.selectors import memberships_for_user

# The switcher lists at most this many tenants; a member of more searches them instead.
SWITCHER_SIZE = 10
# Tenant pages whose counterpart in another tenant the switcher links to (from any other
# page it opens the tenant's datasets): the lists, never one object's page.
SWITCHABLE = (
    "members-page",
    "audit-page",
    "run-list-page",
    "model-list-page",
    "review-queue-page",
    "policies-page",
    "deployment-list-page",
    "notebook-list-page",
    "batch-list-page",
)


def switch_href(slug: str, section: str = "") -> str:
    """Where switching to tenant ``slug`` leads from the page ``section`` (a URL name)."""
    name = section if section in SWITCHABLE else "dataset-list-page"
    return reverse(name, kwargs={"tenant": slug})


class Switcher:
    """The tenant switcher in the page header, read lazily by the template: up to
    ``SWITCHER_SIZE`` of the user's memberships — the current tenant first, then the rest by
    slug — and, for a member of more, their number
    (the header then shows a search instead of the whole list). At most three queries,
    whatever the number of tenants; one for a user of ``SWITCHER_SIZE`` tenants or fewer.
    """

    def __init__(self, request: HttpRequest) -> None:
        self.user = request.user
        match = getattr(request, "resolver_match", None)
        self.current = (match.kwargs.get("tenant") if match else None) or ""
        self.section = (match.url_name if match else None) or ""

    def href(self, membership: Membership) -> str:
        return switch_href(membership.tenant.slug, self.section)

    @cached_property
    def _first(self) -> list[Membership]:
        # Whether the user holds an org-level role rides along (the navigation's links to
        # the cross-tenant pages), so a page asks nothing more for it.
        org_wide = Exists(OrgRoleGrant.objects.filter(user_id=OuterRef("user_id")))
        return list(
            memberships_for_user(user=self.user).annotate(org_wide=org_wide)[: SWITCHER_SIZE + 1]
        )

    @cached_property
    def works_across_tenants(self) -> bool:
        """Staff, or holding an org-level role: the navigation links the cross-tenant pages."""
        if self.user.is_staff:
            return True
        if self._first:
            return bool(self._first[0].org_wide)  # type: ignore[attr-defined]
        return OrgRoleGrant.objects.filter(user_id=self.user.pk or 0).exists()

    @cached_property
    def total(self) -> int:
        if len(self._first) <= SWITCHER_SIZE:
            return len(self._first)
        return memberships_for_user(user=self.user).count()

    @property
    def searchable(self) -> bool:
        """More tenants than the list shows: the header offers a search."""
        return self.total > SWITCHER_SIZE

    @cached_property
    def entries(self) -> list[tuple[Membership, str]]:
        """The memberships listed, each with the link that switches to it."""
        listed = self._first[:SWITCHER_SIZE]
        if self.searchable and self.current and all(m.tenant.slug != self.current for m in listed):
            current = memberships_for_user(user=self.user).filter(tenant__slug=self.current)
            listed = [*current, *listed][:SWITCHER_SIZE]
        return [(m, self.href(m)) for m in listed]

    @property
    def first_tenant(self) -> Any:
        """The tenant the main navigation points at on a page outside every tenant."""
        return self._first[0].tenant if self._first else None

    def __bool__(self) -> bool:
        return bool(self._first)


def tenant_switcher(request: HttpRequest) -> dict[str, Any]:
    """The signed-in user's tenants, for the switcher in the page header."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"switcher": None}
    return {"switcher": Switcher(request)}
