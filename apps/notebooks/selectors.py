from __future__ import annotations

from typing import Any

from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from apps.datasets.models import DatasetVersion
from apps.notebooks.models import AccessStatus, DataAccessRequest, NotebookServer
from apps.tenants.models import Tenant


def access_requests_for(*, tenant: Tenant, user: Any = None) -> QuerySet[DataAccessRequest]:
    """The tenant's requests; only ``user``'s own when a user is given."""
    found = DataAccessRequest.objects.filter(tenant=tenant).select_related(
        "dataset", "dataset_version", "requested_by", "decided_by"
    )
    if user is not None:
        found = found.filter(requested_by=user)
    return found.order_by("-created_at", "id")


def live_grants(*, tenant: Tenant, user: Any) -> QuerySet[DataAccessRequest]:
    """Grants in force for ``user`` in ``tenant``: granted, not revoked, not expired."""
    return DataAccessRequest.objects.filter(
        tenant=tenant, requested_by=user, status=AccessStatus.GRANTED
    ).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))


def granted_versions(*, tenant: Tenant, user: Any) -> QuerySet[DatasetVersion]:
    """Dataset versions ``user`` may read from a notebook: each named by a grant, or a
    version of a dataset granted whole."""
    grants = live_grants(tenant=tenant, user=user)
    covering = grants.filter(
        Q(dataset_version=OuterRef("pk"))
        | Q(dataset_version__isnull=True, dataset=OuterRef("dataset"))
    )
    return (
        DatasetVersion.objects.filter(dataset__tenant=tenant)
        .filter(Exists(covering))
        .select_related("dataset")
        .order_by("dataset__name", "-number")
    )


def grant_for(*, tenant: Tenant, user: Any, version: DatasetVersion) -> DataAccessRequest | None:
    """The grant that covers ``version`` for ``user`` (the one lasting longest), if any."""
    return (
        live_grants(tenant=tenant, user=user)
        .filter(
            Q(dataset_version=version) | Q(dataset_version__isnull=True, dataset=version.dataset)
        )
        .order_by("-expires_at")
        .first()
    )


def notebooks_of(*, tenant: Tenant, user: Any) -> QuerySet[NotebookServer]:
    return (
        NotebookServer.objects.filter(tenant=tenant, user=user)
        .select_related("token")
        .prefetch_related("datasets__dataset")
        .order_by("-created_at", "id")
    )
