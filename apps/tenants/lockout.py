"""Login lockout (django-axes): whose address a login comes from, and the locked-out page.

After ``LOGIN_FAILURE_LIMIT`` failed logins for one username from one address, that pair
is locked out for ``LOGIN_LOCKOUT_MINUTES`` after its last attempt (axes' database
handler, so every web process sees the same count). Other addresses can still sign in as
that user, so an attacker cannot lock a colleague out from elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

from axes.backends import AxesStandaloneBackend
from axes.helpers import get_client_username, get_cool_off
from axes.models import AccessAttempt
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone


class LockoutBackend(AxesStandaloneBackend):
    """django-axes' backend, for sign-ins that come with a request (every HTTP one: the
    login page, the admin, the OAuth sign-in). A call without one (code, such as the test
    client's ``login``) has no address to count and is left to the model backend, rather
    than refused with an error as axes does."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        if request is None:
            return None
        super().authenticate(request, username, password, **kwargs)
        return None


def client_ip(request: HttpRequest) -> str | None:
    """The client's address: REMOTE_ADDR, or behind ``LOGIN_PROXY_COUNT`` proxies the entry
    they appended to X-Forwarded-For (counted from the right: entries further left are the
    client's own word)."""
    count: int = settings.LOGIN_PROXY_COUNT
    if count:
        header = request.META.get("HTTP_X_FORWARDED_FOR", "")
        forwarded = [part.strip() for part in header.split(",") if part.strip()]
        if len(forwarded) >= count:
            return forwarded[-count]
    remote: str | None = request.META.get("REMOTE_ADDR")
    return remote


def seconds_locked(*, username: str, ip_address: str | None) -> int:
    """How long the pair stays locked: the cool-off from its last failed attempt."""
    cool_off = get_cool_off()
    last = (
        AccessAttempt.objects.filter(username=username, ip_address=ip_address)
        .order_by("-attempt_time")
        .values_list("attempt_time", flat=True)
        .first()
    )
    if cool_off is None or last is None:
        return 0
    return max(1, math.ceil((last + cool_off - timezone.now()).total_seconds()))


def locked_out_response(
    request: HttpRequest, original_response: Any = None, credentials: dict[str, Any] | None = None
) -> HttpResponse:
    """429 with the page saying when to try again (and ``Retry-After`` for clients)."""
    username = get_client_username(request, credentials) or ""
    ip_address = getattr(request, "axes_ip_address", None) or client_ip(request)
    seconds = seconds_locked(username=username, ip_address=ip_address)
    minutes = max(1, math.ceil(seconds / 60))
    response = render(
        request,
        "registration/locked.html",
        {
            "username": username,
            "minutes": minutes,
            "failure_limit": settings.LOGIN_FAILURE_LIMIT,
        },
        status=429,
    )
    response["Retry-After"] = str(seconds)
    return response
