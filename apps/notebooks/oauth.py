"""The workbench as JupyterHub's OAuth 2 provider: who the signed-in user is.

django-oauth-toolkit serves authorize/ and token/; this view answers the hub's userinfo
call with the bearer token it got. ``tenants`` lists the user's memberships: the hub lets
in only users with at least one (see docker/jupyterhub/jupyterhub_config.py).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from oauth2_provider.views.generic import ScopedProtectedResourceView

from apps.notebooks.hub import hub_username
from apps.tenants.models import Membership


class UserInfoView(ScopedProtectedResourceView):
    required_scopes = ["profile"]

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        user = request.resource_owner  # type: ignore[attr-defined]
        memberships = Membership.objects.filter(user=user).select_related("tenant")
        return JsonResponse(
            {
                "username": hub_username(user),
                "name": user.get_full_name() or user.get_username(),
                "email": user.email,
                "tenants": [{"slug": m.tenant.slug, "role": m.role} for m in memberships],
            }
        )
