"""What ``OPTIONS`` answers on an API route: the fields of the writes the caller may make."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.metadata import SimpleMetadata
from rest_framework.request import Request, clone_request


class Metadata(SimpleMetadata):
    """DRF's ``SimpleMetadata`` without its probe of ``view.get_object()`` for ``PUT``.

    Our views look their objects up inside the tenant themselves and have no ``pk`` in
    their URLs, so DRF's probe failed an assertion (a 500 on ``OPTIONS policies/{kind}/``).
    Instead of an object permission, the tenant role the write needs decides whether the
    caller is shown its fields.
    """

    def determine_actions(self, request: Request, view: Any) -> dict[str, Any]:
        actions: dict[str, Any] = {}
        for method in sorted({"PUT", "POST"} & set(view.allowed_methods)):
            view.request = clone_request(request, method)
            try:
                view.check_permissions(view.request)
                if not _role_allows(view, method):
                    continue
                actions[method] = self.get_serializer_info(view.get_serializer())
            except (exceptions.APIException, PermissionDenied, Http404):
                continue
            finally:
                view.request = request
        return actions


def _role_allows(view: Any, method: str) -> bool:
    """Whether the caller's tenant role allows ``method`` (views outside a tenant: yes)."""
    access = getattr(view, "access", None)
    if access is None:
        return True
    from apps.tenants.models import Role

    return bool(access.allows(view.required_roles.get(method, Role.SCIENTIST)))
