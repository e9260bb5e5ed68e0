"""JupyterHub's REST API as the workbench's service token sees it.

Every failure to reach the hub (not configured, connection refused, timeout, 5xx, a token
the hub does not accept) is a ``ServiceUnavailable``: the caller answers 503 and, because
it calls the hub inside its transaction, leaves nothing behind. A refusal by the hub of a
well-formed request (its own server limit, say) is a ``DomainError``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import requests
from django.conf import settings
from django.utils.dateparse import parse_datetime

from apps.core.errors import DomainError, ServiceUnavailable

log = logging.getLogger(__name__)

# Connect fast, but give a spawn request time: the hub answers a POST only once the server
# started or its slow_spawn_timeout (10 s by default) passed.
TIMEOUT = (5.0, 30.0)


@dataclass(frozen=True)
class ServerState:
    """One named server as the hub reports it."""

    name: str
    ready: bool
    pending: str | None
    url: str
    started: datetime | None
    last_activity: datetime | None


def _when(value: Any) -> datetime | None:
    return parse_datetime(value) if isinstance(value, str) else None


class Hub:
    def __init__(self, *, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def _call(self, method: str, path: str, body: Any = None) -> requests.Response:
        if not self.token:
            raise ServiceUnavailable(
                "Notebooks are not set up here: JUPYTERHUB_API_TOKEN is empty.",
                code="hub_not_configured",
            )
        try:
            response = requests.request(
                method,
                f"{self.url}/hub/api{path}",
                json=body,
                headers={"Authorization": f"token {self.token}"},
                timeout=TIMEOUT,
            )
        except requests.RequestException as exc:
            log.warning("jupyterhub unreachable", extra={"error": str(exc)})
            raise ServiceUnavailable(
                f"JupyterHub does not answer at {self.url} ({type(exc).__name__}); "
                "nothing was started. Try again in a minute.",
                code="hub_unavailable",
            ) from exc
        if response.status_code >= 500 or response.status_code in (401, 403):
            raise ServiceUnavailable(
                f"JupyterHub answered {response.status_code} to {method} {path}: "
                f"{_message(response)}",
                code="hub_unavailable",
            )
        return response

    def ensure_user(self, name: str) -> None:
        path = f"/users/{quote(name, safe='')}"
        if self._call("GET", path).status_code == 200:
            return
        created = self._call("POST", path)
        # 409: created meanwhile by another request (or a sign-in), which is just as good.
        if created.status_code not in (200, 201, 409):
            raise DomainError(f"JupyterHub refused the user '{name}': {_message(created)}")

    def start(
        self, *, user: str, server: str, display_name: str, user_options: dict[str, Any]
    ) -> bool:
        """Ask the hub to start a named server; True if it is up already (201)."""
        response = self._call(
            "POST",
            f"/users/{quote(user, safe='')}/servers/{server}",
            {"display_name": display_name, "user_options": user_options},
        )
        if response.status_code not in (201, 202):
            raise DomainError(
                f"JupyterHub refused to start the server: {_message(response)}",
                code="hub_refused",
            )
        return response.status_code == 201

    def stop(self, *, user: str, server: str) -> None:
        """Stop and delete a named server; one the hub no longer has is stopped already."""
        response = self._call(
            "DELETE", f"/users/{quote(user, safe='')}/servers/{server}", {"remove": True}
        )
        if response.status_code not in (202, 204, 404):
            raise DomainError(
                f"JupyterHub refused to stop the server: {_message(response)}", code="hub_refused"
            )

    def active_users(self) -> list[str]:
        """Names of the hub's users with at least one server running or starting."""
        response = self._call("GET", "/users?state=active&limit=1000")
        return [str(u["name"]) for u in response.json() if isinstance(u, dict)]

    def servers(self, user: str) -> dict[str, ServerState]:
        """The user's named servers (none if the hub does not know the user)."""
        response = self._call("GET", f"/users/{quote(user, safe='')}")
        if response.status_code == 404:
            return {}
        model = response.json()
        found: dict[str, ServerState] = {}
        for name, server in (model.get("servers") or {}).items():
            found[name] = ServerState(
                name=name,
                ready=bool(server.get("ready")),
                pending=server.get("pending"),
                url=str(server.get("url") or ""),
                started=_when(server.get("started")),
                last_activity=_when(server.get("last_activity")),
            )
        return found


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message") or response.reason)
    except ValueError:
        return response.text[:200] or str(response.reason)


def get_hub() -> Hub:
    return Hub(url=settings.JUPYTERHUB_URL, token=settings.JUPYTERHUB_API_TOKEN)


def hub_username(user: Any) -> str:
    # JupyterHub lowercases the names its authenticator returns; use the same everywhere.
    return str(user.get_username()).lower()


def public_url(server: Any) -> str | None:
    """Where a user opens a running server (through the hub's proxy)."""
    if server.status != "running" or not server.url:
        return None
    return f"{settings.JUPYTERHUB_PUBLIC_URL}{server.url}"
