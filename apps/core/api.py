"""API plumbing shared by every app: error envelope, pagination."""

from __future__ import annotations

import logging
from typing import Any, cast

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.pagination import BasePagination, PageNumberPagination
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.utils.urls import remove_query_param, replace_query_param
from rest_framework.views import exception_handler as drf_exception_handler

from apps.core import keyset
from apps.core.errors import DomainError, InvalidInput, ServiceUnavailable

log = logging.getLogger("workbench.api")


def default_permissions_and(*extra: type[BasePermission]) -> list[type[BasePermission]]:
    """The API's default permission classes followed by ``extra``.

    A view that sets ``permission_classes`` replaces the defaults, and with them the limits
    on notebook tokens (``NotebookTokenLimits``): a view that needs more checks adds them to
    the defaults through this, never instead of them (tests/test_permissions.py walks every
    view to hold it).
    """
    # (The stubs type the setting as its dotted paths; DRF has imported them by now.)
    defaults = cast("list[type[BasePermission]]", api_settings.DEFAULT_PERMISSION_CLASSES)
    return [*defaults, *extra]


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class KeysetPagination(BasePagination):
    """For lists that grow without bound (the audit log): pages found by position, not
    offset, and counted only up to ``keyset.COUNT_CAP`` (see apps/core/keyset.py). The body
    is the other lists' (``count``, ``next``, ``previous``, ``results``) plus
    ``count_exact``; ``next``/``previous`` carry a ``cursor``; ``?page=`` works within
    the cap."""

    page_size = Pagination.page_size
    max_page_size = Pagination.max_page_size

    def paginate_queryset(self, queryset: Any, request: Any, view: Any = None) -> list[Any]:
        self.request = request
        self.page = keyset.keyset_page(
            queryset,
            size=Pagination().get_page_size(request) or self.page_size,
            cursor=request.query_params.get("cursor"),
            page=request.query_params.get("page"),
        )
        return self.page.rows

    def _link(self, cursor: str | None) -> str | None:
        if cursor is None:
            return None
        url = self.request.build_absolute_uri()
        return replace_query_param(remove_query_param(url, "page"), "cursor", cursor)

    def get_paginated_response(self, data: Any) -> Response:
        return Response(
            {
                "count": self.page.count,
                "count_exact": self.page.count_exact,
                "next": self._link(self.page.next_cursor),
                "previous": self._link(self.page.previous_cursor),
                "results": data,
            }
        )

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["count", "count_exact", "results"],
            "properties": {
                "count": {
                    "type": "integer",
                    "description": f"rows in the list, counted up to {keyset.COUNT_CAP:,}",
                },
                "count_exact": {
                    "type": "boolean",
                    "description": f"false when the list has more than {keyset.COUNT_CAP:,} "
                    "rows (count is then that cap)",
                },
                "next": {"type": "string", "nullable": True, "format": "uri"},
                "previous": {"type": "string", "nullable": True, "format": "uri"},
                "results": schema,
            },
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {"name": "cursor", "required": False, "in": "query",
             "description": "a position from a next or previous link",
             "schema": {"type": "string"}},
            {"name": "page", "required": False, "in": "query",
             "description": f"a page number, within the first {keyset.COUNT_CAP:,} rows",
             "schema": {"type": "integer"}},
            {"name": "page_size", "required": False, "in": "query",
             "description": f"rows per page (default {self.page_size}, at most "
             f"{self.max_page_size})", "schema": {"type": "integer"}},
        ]  # fmt: skip


def flatten_errors(detail: Any) -> list[str]:
    """A DRF error detail (nested dicts and lists) as flat 'field: message' lines."""
    if isinstance(detail, dict):
        return [f"{key}: {msg}" for key, value in detail.items() for msg in flatten_errors(value)]
    if isinstance(detail, list):
        return [msg for item in detail for msg in flatten_errors(item)]
    return [str(detail)]


def _codes(codes: Any) -> list[str]:
    if isinstance(codes, dict):
        return [c for value in codes.values() for c in _codes(value)]
    if isinstance(codes, list):
        return [c for item in codes for c in _codes(item)]
    return [str(codes)]


def _fields(detail: Any) -> dict[str, Any]:
    if not isinstance(detail, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in detail.items():
        if key == "non_field_errors":
            continue
        out[key] = (
            value
            if isinstance(value, dict)
            else [str(v) for v in (value if isinstance(value, list) else [value])]
        )
    return out


def error_response(
    code: str, message: str, http_status: int, fields: dict[str, Any] | None = None, **extra: Any
) -> Response:
    body: dict[str, Any] = {"code": code, "message": message, "fields": fields or {}}
    body.update({k: v for k, v in extra.items() if v is not None})
    return Response({"error": body}, status=http_status)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Every API error as ``{"error": {"code", "message", "fields"}}`` with the right status."""
    if isinstance(exc, DomainError):
        return error_response(
            exc.code, exc.message, status.HTTP_409_CONFLICT, status=exc.current_status
        )
    if isinstance(exc, InvalidInput):
        return error_response(
            exc.code, exc.message, status.HTTP_400_BAD_REQUEST, exc.fields, line=exc.line
        )
    if isinstance(exc, ServiceUnavailable):
        unavailable = error_response(exc.code, exc.message, status.HTTP_503_SERVICE_UNAVAILABLE)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            unavailable["Retry-After"] = str(retry_after)
        return unavailable
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    assert isinstance(exc, exceptions.APIException)
    detail = exc.detail
    if isinstance(exc, exceptions.ValidationError):
        messages = flatten_errors(detail)
        message = (
            messages[0]
            if len(messages) == 1
            else f"{len(messages)} problems: " + "; ".join(messages)
        )
        codes = _codes(exc.get_codes())
        code = codes[0] if len(codes) == 1 else "invalid"
    else:
        message = " ".join(flatten_errors(detail))
        detail_codes = exc.get_codes()
        code = detail_codes if isinstance(detail_codes, str) else str(exc.default_code)
    response.data = {"error": {"code": code, "message": message, "fields": _fields(detail)}}
    return response
