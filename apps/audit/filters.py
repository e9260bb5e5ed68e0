import django_filters

from apps.audit.models import AuditEvent


class AuditEventFilter(django_filters.FilterSet):
    """Serves both the audit API list and the dashboard's audit page."""

    verb = django_filters.CharFilter(field_name="verb")
    actor = django_filters.CharFilter(field_name="actor_name")
    object_type = django_filters.CharFilter(field_name="object_type")
    object_id = django_filters.CharFilter(field_name="object_id")
    since = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = AuditEvent
        fields = ["verb", "actor", "object_type", "object_id", "since", "until"]
