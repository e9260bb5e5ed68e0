"""``Authorization: Bearer <token>`` authentication for the API."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from apps.core import rawsql
from apps.tenants.models import ApiToken, Tenant, hash_token

# Writing last_used_at on every request would turn every read into a write; once a minute
# per token is plenty to tell a live token from a dead one.
_LAST_USED_GRANULARITY = timedelta(minutes=1)


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, ApiToken] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        parts = header.split()
        if parts[0].lower() != self.keyword.lower():
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Malformed Authorization header: use 'Bearer <token>'."
            )
        token = token_by_hash(hash_token(parts[1]))
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This token was revoked.")
        now = timezone.now()
        if token.expires_at is not None and token.expires_at <= now:
            raise exceptions.AuthenticationFailed("This token has expired.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("The token's user is inactive.")
        if token.last_used_at is None or now - token.last_used_at > _LAST_USED_GRANULARITY:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


def token_by_hash(token_hash: str) -> ApiToken | None:
    """The token with its user and tenant, in one query (every API request makes it)."""
    token = rawsql.Part(ApiToken, "t")
    user = rawsql.Part(get_user_model(), "u", attach=(0, "user"))
    tenant = rawsql.Part(Tenant, "n", attach=(0, "tenant"))
    rows = rawsql.fetch(
        [token, user, tenant],
        f"FROM {rawsql.table(ApiToken)} t {rawsql.join(user, token, 'user')} "
        f"{rawsql.join(tenant, token, 'tenant', outer=True)} "
        f"WHERE {rawsql.equals(token, 'token_hash')}",
        [token_hash],
    )
    return rows[0][0] if rows else None  # type: ignore[return-value]


def request_via(request: Any) -> str:
    """How the caller got in, for the audit log: ``token:<id>`` or ``session``."""
    auth = getattr(request, "auth", None)
    if isinstance(auth, ApiToken):
        return f"token:{auth.pk}"
    return "session"
