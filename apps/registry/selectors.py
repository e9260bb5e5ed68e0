from __future__ import annotations

from django.db.models import Count, Max, QuerySet

from apps.registry.models import ModelVersion, RegisteredModel
from apps.tenants.models import Tenant


def models_for_tenant(*, tenant: Tenant) -> QuerySet[RegisteredModel]:
    return (
        RegisteredModel.objects.filter(tenant=tenant)
        .annotate(version_count=Count("versions"), latest_version=Max("versions__number"))
        .order_by("name")
    )


def versions_of_model(*, model: RegisteredModel) -> QuerySet[ModelVersion]:
    return (
        ModelVersion.objects.filter(registered_model=model)
        .select_related("run__dataset_version__dataset")
        .order_by("-number")
    )
