from __future__ import annotations

from django.db.models import Count, Max, QuerySet

from apps.datasets.models import Dataset, DatasetVersion
from apps.tenants.models import Tenant


def datasets_for_tenant(*, tenant: Tenant) -> QuerySet[Dataset]:
    return (
        Dataset.objects.filter(tenant=tenant)
        .select_related("created_by")
        .annotate(version_count=Count("versions"), latest_version=Max("versions__number"))
        .order_by("-created_at", "id")
    )


def shared_datasets() -> QuerySet[Dataset]:
    """Golden sets owned by no tenant (one domain vertical each)."""
    return (
        Dataset.objects.filter(tenant__isnull=True)
        .annotate(version_count=Count("versions"), latest_version=Max("versions__number"))
        .order_by("domain", "name")
    )


def versions_of(*, dataset: Dataset) -> QuerySet[DatasetVersion]:
    return (
        DatasetVersion.objects.filter(dataset=dataset)
        .select_related("created_by")
        .order_by("-number")
    )


def version_lookup(*, dataset: Dataset, ref: str) -> DatasetVersion | None:
    """A version by its number (``3``) or its id (``dv_...``)."""
    versions = versions_of(dataset=dataset)
    if ref.isdigit():
        return versions.filter(number=int(ref)).first()
    return versions.filter(pk=ref).first()


def versions_for_tenant(*, tenant: Tenant) -> QuerySet[DatasetVersion]:
    return DatasetVersion.objects.filter(dataset__tenant=tenant).select_related("dataset")
