"""Request id and request-latency metrics for every HTTP request; the API's error envelope
on the errors Django answers itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse

from apps.core.context import (
    PREWARM_ENVIRON_KEY,
    clean_request_id,
    reset_request_id,
    set_request_id,
)
from apps.core.metrics import HTTP_REQUEST_SECONDS

log = logging.getLogger("workbench.http")


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = clean_request_id(request.headers.get("X-Request-ID"))
        request.request_id = request_id  # type: ignore[attr-defined]
        token = set_request_id(request_id)
        try:
            response = self.get_response(request)
        finally:
            reset_request_id(token)
        response["X-Request-ID"] = request_id
        return response


class MetricsMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.META.get(PREWARM_ENVIRON_KEY):
            return self.get_response(request)  # the process's own start-up request
        started = time.perf_counter()
        response = self.get_response(request)
        elapsed = time.perf_counter() - started
        match = getattr(request, "resolver_match", None)
        # The route pattern, never the raw path: ids in paths would explode cardinality.
        route = match.route if match is not None else "<unmatched>"
        HTTP_REQUEST_SECONDS.labels(
            route or "/", request.method or "", str(response.status_code)
        ).observe(elapsed)
        log.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "ms": round(elapsed * 1000, 2),
            },
        )
        return response


API_PREFIX = "/api/"
ERROR_CODES = {
    400: "bad_request",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    500: "server_error",
}
# Headers of Django's own error response that the envelope keeps.
KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


class ApiErrorEnvelopeMiddleware:
    """Errors under ``/api/`` that Django answers itself, outside DRF's views (a path no
    route matches, a request Django refuses before any view, a crash), in the API's error
    envelope ``{"error": {"code", "message", "fields"}}`` rather than Django's HTML pages:
    automation reads every error of the API the same way."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            response.status_code < 400
            or not request.path.startswith(API_PREFIX)
            or response.streaming
            or response.get("Content-Type", "").startswith("application/json")
        ):
            return response
        status = response.status_code
        message = f"No such path: {request.path}" if status == 404 else response.reason_phrase
        envelope = JsonResponse(
            {
                "error": {
                    "code": ERROR_CODES.get(status, "server_error" if status >= 500 else "error"),
                    "message": message,
                    "fields": {},
                }
            },
            status=status,
        )
        for header in KEPT_HEADERS:
            if header in response:
                envelope[header] = response[header]
        return envelope
