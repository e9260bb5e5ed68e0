"""One FilterSet per list, shared by the API and the dashboard page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import django_filters
from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet

from apps.tenants.models import Tenant


def _search(queryset: QuerySet[Any], value: str, fields: Sequence[str]) -> QuerySet[Any]:
    value = value.strip()
    if not value:
        return queryset
    match = Q()
    for field in fields:
        match |= Q(**{f"{field}__icontains": value})
    return queryset.filter(match)


class UserFilter(django_filters.FilterSet):
    """Serves both ``/api/v1/users/`` and the staff Users page."""

    search = django_filters.CharFilter(
        method="filter_search", label="Search", help_text="part of the username or e-mail"
    )
    is_active = django_filters.BooleanFilter(field_name="is_active", label="Active")

    class Meta:
        model = get_user_model()
        fields = ["search", "is_active"]

    def filter_search(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return _search(queryset, value, ("username", "email"))


class TenantFilter(django_filters.FilterSet):
    """Serves both the tenant list API and the staff Tenants page."""

    search = django_filters.CharFilter(
        method="filter_search", label="Search", help_text="part of the slug or name"
    )

    class Meta:
        model = Tenant
        fields = ["search"]

    def filter_search(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return _search(queryset, value, ("slug", "name"))
