import django_filters
from django.db.models import Q, QuerySet

from apps.datasets.models import Dataset, DatasetKind, Task


class DatasetFilter(django_filters.FilterSet):
    """Serves both the datasets API list and the dashboard's datasets page."""

    kind = django_filters.ChoiceFilter(choices=DatasetKind.choices)
    task = django_filters.ChoiceFilter(choices=Task.choices)
    domain = django_filters.CharFilter()
    q = django_filters.CharFilter(method="search", label="Search")

    class Meta:
        model = Dataset
        fields = ["kind", "task", "domain", "q"]

    def search(self, queryset: QuerySet[Dataset], name: str, value: str) -> QuerySet[Dataset]:
        return queryset.filter(Q(name__icontains=value) | Q(description__icontains=value))
