from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.promotions import services
from apps.promotions.models import PromotionRequest, Target
from apps.registry.models import ModelVersion
from apps.tenants.auth import request_via
from apps.tenants.models import Role
from apps.tenants.scoping import TenantScopedMixin


class GateDatasetVersionSerializer(serializers.Serializer[Any]):
    """One dataset version the gates were checked on, as recorded when they were."""

    id = serializers.CharField()
    dataset = serializers.CharField()
    dataset_name = serializers.CharField()
    kind = serializers.CharField()
    number = serializers.IntegerField()
    sha256 = serializers.CharField()
    rows = serializers.IntegerField()
    shared = serializers.BooleanField(help_text="a staff-owned golden set of the domain")
    uploaded_by = serializers.CharField(
        allow_null=True, help_text="who uploaded this version (null for a shared set)"
    )
    evaluation = serializers.CharField()


class PromotionOutputSerializer(serializers.ModelSerializer[PromotionRequest]):
    model_version = serializers.CharField(source="model_version_id", read_only=True)
    model = serializers.CharField(source="model_version.registered_model.name", read_only=True)
    version = serializers.IntegerField(source="model_version.number", read_only=True)
    champion = serializers.CharField(source="champion_id", read_only=True, allow_null=True)
    requested_by = serializers.SlugRelatedField(slug_field="username", read_only=True)  # type: ignore[var-annotated]
    decided_by = serializers.SlugRelatedField(slug_field="username", read_only=True)  # type: ignore[var-annotated]
    gate_dataset_versions = GateDatasetVersionSerializer(many=True, read_only=True)

    class Meta:
        model = PromotionRequest
        fields = [
            "id",
            "model_version",
            "model",
            "version",
            "target",
            "status",
            "artifact_sha256",
            "evaluation_ids",
            "gate_results",
            "gate_dataset_versions",
            "champion",
            "failure",
            "requested_by",
            "decided_by",
            "decision_comment",
            "decided_at",
            "created_at",
        ]


class PromotionInputSerializer(serializers.Serializer[Any]):
    model_version = serializers.CharField()
    target = serializers.ChoiceField(choices=Target.choices)

    def validate_model_version(self, value: str) -> ModelVersion:
        found = (
            ModelVersion.objects.filter(pk=value, registered_model__tenant=self.context["tenant"])
            .select_related("registered_model")
            .first()
        )
        if found is None:
            raise serializers.ValidationError("No such model version.")
        return found


class DecisionSerializer(serializers.Serializer[Any]):
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=5000)


def _promotions(tenant: Any) -> Any:
    return PromotionRequest.objects.filter(tenant=tenant).select_related(
        "model_version__registered_model", "requested_by", "decided_by"
    )


class PromotionListCreateApi(TenantScopedMixin, generics.ListAPIView[PromotionRequest]):
    serializer_class = PromotionOutputSerializer
    filterset_fields = ["status", "target", "model_version"]

    def get_queryset(self) -> Any:
        return _promotions(self.tenant)

    @extend_schema(request=PromotionInputSerializer, responses={202: PromotionOutputSerializer})
    def post(self, request: Request, tenant: str) -> Response:
        data = PromotionInputSerializer(data=request.data, context={"tenant": self.tenant})
        data.is_valid(raise_exception=True)
        promotion = services.promotion_request(
            actor=request.user, tenant=self.tenant, via=request_via(request), **data.validated_data
        )
        return Response(
            PromotionOutputSerializer(_promotions(self.tenant).get(pk=promotion.pk)).data,
            status=status.HTTP_202_ACCEPTED,
        )


class PromotionScopedMixin(TenantScopedMixin):
    kwargs: dict[str, Any]

    def get_promotion(self) -> PromotionRequest:
        found = _promotions(self.tenant).filter(pk=self.kwargs["promotion_id"]).first()
        if found is None:
            raise Http404("No such promotion request.")
        return found


class PromotionDetailApi(PromotionScopedMixin, generics.GenericAPIView[PromotionRequest]):
    serializer_class = PromotionOutputSerializer

    def get(self, request: Request, tenant: str, promotion_id: str) -> Response:
        return Response(PromotionOutputSerializer(self.get_promotion()).data)


class PromotionApproveApi(PromotionScopedMixin, generics.GenericAPIView[PromotionRequest]):
    serializer_class = PromotionOutputSerializer
    required_roles = {"POST": Role.REVIEWER}

    @extend_schema(request=DecisionSerializer, responses=PromotionOutputSerializer)
    def post(self, request: Request, tenant: str, promotion_id: str) -> Response:
        data = DecisionSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.promotion_approve(
            actor=request.user,
            promotion=self.get_promotion(),
            comment=data.validated_data["comment"],
            via=request_via(request),
        )
        return Response(PromotionOutputSerializer(self.get_promotion()).data)


class PromotionRejectApi(PromotionApproveApi):
    @extend_schema(request=DecisionSerializer, responses=PromotionOutputSerializer)
    def post(self, request: Request, tenant: str, promotion_id: str) -> Response:
        data = DecisionSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.promotion_reject(
            actor=request.user,
            promotion=self.get_promotion(),
            comment=data.validated_data["comment"],
            via=request_via(request),
        )
        return Response(PromotionOutputSerializer(self.get_promotion()).data)
