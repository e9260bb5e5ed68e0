"""API throttling: one request rate per API token, or per user for the dashboard's session.

Keyed on the token rather than the user, so one runaway script (or a notebook's token)
uses up its own budget, not its owner's other automations'. Over the rate the API answers
429 with ``Retry-After`` in the error envelope (``apps.core.api.exception_handler``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle

from apps.tenants.models import ApiToken


class TokenRateThrottle(SimpleRateThrottle):
    scope = "api"

    def get_rate(self) -> str:
        # DRF makes a throttle per request, so this reads the setting each time (DRF's own
        # THROTTLE_RATES is frozen at import): the setting alone decides, tests included.
        return str(settings.API_THROTTLE_RATE)

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        if isinstance(request.auth, ApiToken):
            ident = f"token:{request.auth.pk}"
        elif request.user is not None and request.user.is_authenticated:
            ident = f"user:{request.user.pk}"
        else:
            return None  # unauthenticated: refused with 401 before any throttle counts
        return self.cache_format % {"scope": self.scope, "ident": ident}
