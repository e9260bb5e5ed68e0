"""The one domain error type: an illegal state change, answered with 409 by the API."""

from __future__ import annotations


class DomainError(Exception):
    """A request that is well-formed but not allowed in the object's current state."""

    code = "conflict"

    def __init__(self, message: str, *, code: str | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.current_status = status


class InvalidInput(Exception):
    """Input the door could not check alone (e.g. an upload's content): a 400 with fields."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid",
        fields: dict[str, list[str]] | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.fields = fields or {}
        self.line = line


class ServiceUnavailable(Exception):
    """A service the request depends on (e.g. JupyterHub) does not answer: a 503, and the
    request changed nothing."""

    def __init__(self, message: str, *, code: str = "unavailable") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
