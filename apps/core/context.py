"""The request id of the work in progress, shared by web requests, logs and tasks."""

from __future__ import annotations

import contextvars
import re
import uuid

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_VALID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """Accept a caller's X-Request-ID only if it is short and plain; else make one."""
    if value and _VALID.match(value):
        return value
    return new_request_id()


def get_request_id() -> str | None:
    return _request_id.get()


def set_request_id(value: str | None) -> contextvars.Token[str | None]:
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


# The WSGI environ key that marks the start-up request of a web process's prewarm
# (``apps.deployments.dataplane.prewarm``): not an HTTP header, so no client can set it; the
# metrics and the request log leave that request out.
PREWARM_ENVIRON_KEY = "workbench.prewarm"
