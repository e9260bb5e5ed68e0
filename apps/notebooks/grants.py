"""Writes for data-access requests: a member asks for a dataset (or one version) for a
stated purpose, ``access_request_create`` (requested) -> ``access_request_grant`` or
``access_request_deny`` by a reviewer or admin who is not the requester -> a grant may be
``access_request_revoke``-d. Each is atomic and audited.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import DomainError, InvalidInput
from apps.datasets.models import Dataset, DatasetVersion
from apps.notebooks import selectors
from apps.notebooks.models import AccessStatus, DataAccessRequest
from apps.tenants.models import Tenant


def _request_state(request: DataAccessRequest) -> dict[str, Any]:
    return {
        "status": request.status,
        "dataset": request.dataset_id,
        "dataset_version": request.dataset_version_id,
        "expires_at": request.expires_at.isoformat() if request.expires_at else None,
    }


# --- data access ------------------------------------------------------------------------


@transaction.atomic
def access_request_create(
    *,
    actor: Any,
    tenant: Tenant,
    dataset: Dataset,
    purpose: str,
    dataset_version: DatasetVersion | None = None,
    via: str = "",
) -> DataAccessRequest:
    if dataset.tenant_id != tenant.pk or (
        dataset_version is not None and dataset_version.dataset_id != dataset.pk
    ):
        raise InvalidInput("No such dataset.", fields={"dataset": ["No such dataset."]})
    open_ones = DataAccessRequest.objects.select_for_update().filter(
        tenant=tenant, requested_by=actor, dataset=dataset, dataset_version=dataset_version
    )
    if open_ones.filter(status=AccessStatus.REQUESTED).exists():
        raise DomainError(
            f"You already asked for access to '{dataset.name}'; wait for a reviewer's answer.",
            code="exists",
        )
    if dataset_version is not None:
        covered = selectors.grant_for(tenant=tenant, user=actor, version=dataset_version)
    else:
        covered = (
            selectors.live_grants(tenant=tenant, user=actor)
            .filter(dataset=dataset, dataset_version__isnull=True)
            .first()
        )
    if covered is not None:
        raise DomainError(
            f"You already have access to '{dataset.name}' (grant {covered.pk}).", code="exists"
        )
    request = DataAccessRequest.objects.create(
        tenant=tenant,
        dataset=dataset,
        dataset_version=dataset_version,
        requested_by=actor,
        purpose=purpose,
    )
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="data_access.request",
        obj=request,
        after={**_request_state(request), "purpose": purpose},
        via=via,
    )
    return request


def _decide(
    *,
    actor: Any,
    request: DataAccessRequest,
    allowed_from: AccessStatus,
    to: AccessStatus,
    verb: str,
    comment: str,
    expires_at: datetime | None = None,
    via: str,
) -> DataAccessRequest:
    locked = DataAccessRequest.objects.select_for_update().get(pk=request.pk)
    if locked.status != allowed_from:
        raise DomainError(
            f"This request is {locked.status}; only a {allowed_from.value} one can be {to.value}.",
            code="invalid_state",
            status=locked.status,
        )
    if to != AccessStatus.REVOKED and locked.requested_by_id == actor.pk:
        raise DomainError(
            "You cannot decide your own request: another reviewer or admin must.",
            code="own_request",
        )
    before = _request_state(locked)
    locked.status = to
    locked.decided_by = actor
    locked.decided_at = timezone.now()
    locked.comment = comment
    if expires_at is not None:
        locked.expires_at = expires_at
    locked.save(update_fields=["status", "decided_by", "decided_at", "comment", "expires_at"])
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb=verb,
        obj=locked,
        before=before,
        after={**_request_state(locked), "comment": comment},
        via=via,
    )
    return locked


@transaction.atomic
def access_request_grant(
    *,
    actor: Any,
    request: DataAccessRequest,
    comment: str = "",
    expires_at: datetime | None = None,
    via: str = "",
) -> DataAccessRequest:
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput(
            "expires_at must be in the future.", fields={"expires_at": ["Must be in the future."]}
        )
    return _decide(
        actor=actor,
        request=request,
        allowed_from=AccessStatus.REQUESTED,
        to=AccessStatus.GRANTED,
        verb="data_access.grant",
        comment=comment,
        expires_at=expires_at,
        via=via,
    )


@transaction.atomic
def access_request_deny(
    *, actor: Any, request: DataAccessRequest, comment: str = "", via: str = ""
) -> DataAccessRequest:
    return _decide(
        actor=actor,
        request=request,
        allowed_from=AccessStatus.REQUESTED,
        to=AccessStatus.DENIED,
        verb="data_access.deny",
        comment=comment,
        via=via,
    )


@transaction.atomic
def access_request_revoke(
    *, actor: Any, request: DataAccessRequest, comment: str = "", via: str = ""
) -> DataAccessRequest:
    """End a grant: notebooks already running lose the data at their next call."""
    return _decide(
        actor=actor,
        request=request,
        allowed_from=AccessStatus.GRANTED,
        to=AccessStatus.REVOKED,
        verb="data_access.revoke",
        comment=comment,
        via=via,
    )


def check_granted(*, tenant: Tenant, user: Any, versions: Sequence[DatasetVersion]) -> None:
    """Refuse, naming each, versions of another tenant or that ``user`` has no grant for."""
    problems: list[str] = []
    granted = set(
        selectors.granted_versions(tenant=tenant, user=user)
        .filter(pk__in=[v.pk for v in versions])
        .values_list("pk", flat=True)
    )
    for version in versions:
        if version.dataset.tenant_id != tenant.pk:
            problems.append(f"{version.pk}: no such dataset version.")
        elif version.pk not in granted:
            problems.append(
                f"{version.pk} ('{version.dataset.name}' v{version.number}): you have no access "
                "grant for it; request access (data-access/) and wait for a reviewer."
            )
    if problems:
        raise InvalidInput(problems[0], fields={"datasets": problems})
