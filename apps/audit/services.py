from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from apps.audit.models import AuditEvent
from apps.core.context import get_request_id


def audit_record(
    *,
    actor: AbstractBaseUser | AnonymousUser | None,
    tenant: Any,
    verb: str,
    obj: Any = None,
    object_type: str = "",
    object_id: str = "",
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    via: str = "",
) -> AuditEvent:
    """Append one audit event; call it inside the transaction of the change it records."""
    real_actor: Any = (
        actor if actor is not None and getattr(actor, "is_authenticated", False) else None
    )
    if obj is not None:
        object_type = object_type or obj._meta.model_name
        object_id = object_id or str(obj.pk)
    return AuditEvent.objects.create(
        tenant=tenant,
        actor=real_actor,
        actor_name=real_actor.get_username() if real_actor is not None else "system",
        via=via,
        verb=verb,
        object_type=object_type,
        object_id=object_id,
        object_repr=str(obj)[:200] if obj is not None else "",
        before=before,
        after=after,
        request_id=get_request_id() or "",
    )
