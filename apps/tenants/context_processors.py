from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from apps.tenants.selectors import memberships_for_user


def tenant_switcher(request: HttpRequest) -> dict[str, Any]:
    """The signed-in user's tenants, for the switcher in the page header."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"my_memberships": []}
    return {"my_memberships": list(memberships_for_user(user=user))}
