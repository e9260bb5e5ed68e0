"""Model health across tenants over REST (staff): ``GET /api/v1/model-health/``."""

from __future__ import annotations

import dataclasses
from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.api import default_permissions_and
from apps.registry.health import BINS, Served, health_report
from apps.registry.models import ModelKind
from apps.tenants.api import OrgOperatorOrReviewer


class HealthQuerySerializer(serializers.Serializer[Any]):
    kind = serializers.ChoiceField(choices=ModelKind.choices, default=ModelKind.CLASSIFIER)
    older_than_days = serializers.IntegerField(
        default=90,
        min_value=1,
        max_value=3650,
        help_text="a production version this old is listed as stale",
    )
    limit = serializers.IntegerField(
        default=100, min_value=1, max_value=1000, help_text="rows per list"
    )
    fresh = serializers.BooleanField(
        default=False,
        help_text="compute the report now instead of serving the last one (which is "
        "recomputed in the background once older than MODEL_HEALTH_MAX_AGE_S)",
    )


class SpreadSerializer(serializers.Serializer[Any]):
    metric = serializers.CharField()
    count = serializers.IntegerField(help_text="production versions measured on a golden set")
    min = serializers.FloatField(allow_null=True)
    p10 = serializers.FloatField(allow_null=True)
    p50 = serializers.FloatField(allow_null=True)
    p90 = serializers.FloatField(allow_null=True)
    max = serializers.FloatField(allow_null=True)
    histogram = serializers.ListField(
        child=serializers.IntegerField(), help_text=f"{BINS} equal bins over [0, 1]"
    )


class RegressedSerializer(serializers.Serializer[Any]):
    tenant = serializers.CharField()
    model = serializers.CharField()
    version = serializers.IntegerField()
    model_version = serializers.CharField()
    promotion = serializers.CharField()
    status = serializers.CharField()
    against = serializers.CharField(help_text="champion, base or trigram")
    dataset = serializers.CharField(allow_null=True)
    metric = serializers.CharField()
    value = serializers.FloatField()
    champion_value = serializers.FloatField()
    delta = serializers.FloatField()


class StaleSerializer(serializers.Serializer[Any]):
    tenant = serializers.CharField()
    model = serializers.CharField()
    version = serializers.IntegerField()
    model_version = serializers.CharField()
    age_days = serializers.IntegerField()


class HealthSerializer(serializers.Serializer[Any]):
    kind = serializers.CharField()
    production_versions = serializers.IntegerField()
    metrics = SpreadSerializer(many=True, help_text="golden-set metrics of production versions")
    regressed = RegressedSerializer(many=True)
    stale = StaleSerializer(many=True)
    stale_count = serializers.IntegerField()
    no_production_count = serializers.IntegerField()
    no_production = serializers.ListField(child=serializers.CharField(), help_text="tenant slugs")
    older_than_days = serializers.IntegerField()
    computed_at = serializers.DateTimeField(help_text="when this report was computed")
    age_seconds = serializers.FloatField(help_text="how old the report is")
    took_ms = serializers.FloatField(help_text="how long computing it took")
    refreshing = serializers.BooleanField(
        help_text="the report is older than the maximum age and a newer one is being computed"
    )


def served_data(served: Served) -> dict[str, Any]:
    """A served report as the API's body (the report's figures and its age)."""
    return {
        **dataclasses.asdict(served.health),
        "computed_at": served.computed_at,
        "age_seconds": round(served.age_seconds, 1),
        "took_ms": served.took_ms,
        "refreshing": served.refreshing,
    }


class ModelHealthApi(generics.GenericAPIView[Any]):
    """Across every tenant, for one model kind: the spread of each golden metric over the
    production versions, the versions measured worse than their champion, production
    versions older than ``older_than_days``, and the tenants with none in production.

    Served from the last report computed for the same query (``computed_at``,
    ``age_seconds``): it reads every production version, so it is recomputed in the
    background once older than ``MODEL_HEALTH_MAX_AGE_S``, or now with ``fresh=true``."""

    serializer_class = HealthSerializer
    permission_classes = default_permissions_and(OrgOperatorOrReviewer)

    @extend_schema(parameters=[HealthQuerySerializer], responses=HealthSerializer)
    def get(self, request: Request) -> Response:
        query = HealthQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(HealthSerializer(served_data(health_report(**query.validated_data))).data)
