from __future__ import annotations

from typing import Any

from django.http import Http404, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.artifacts import get_store
from apps.core.schema import ErrorSerializer
from apps.registry import selectors, services
from apps.registry.models import ModelVersion, RegisteredModel
from apps.tenants.scoping import TenantScopedMixin


class ModelOutputSerializer(serializers.ModelSerializer[RegisteredModel]):
    version_count = serializers.IntegerField(read_only=True, default=0)
    latest_version = serializers.IntegerField(read_only=True, allow_null=True, default=None)
    mlflow_name = serializers.CharField(read_only=True)

    class Meta:
        model = RegisteredModel
        fields = [
            "id",
            "name",
            "kind",
            "description",
            "mlflow_name",
            "version_count",
            "latest_version",
            "created_at",
        ]


class ModelVersionOutputSerializer(serializers.ModelSerializer[ModelVersion]):
    model = serializers.CharField(source="registered_model.name", read_only=True)
    run = serializers.CharField(source="run_id", read_only=True)
    dataset_version = serializers.CharField(source="run.dataset_version_id", read_only=True)

    class Meta:
        model = ModelVersion
        fields = [
            "id",
            "model",
            "number",
            "sha256",
            "size_bytes",
            "memory_bytes",
            "format",
            "base_sha256",
            "base_memory_bytes",
            "run",
            "dataset_version",
            "stage",
            "aliases",
            "labels",
            "metrics",
            "mlflow_version",
            "created_at",
        ]


class ModelScopedMixin(TenantScopedMixin):
    kwargs: dict[str, Any]

    def get_model(self) -> RegisteredModel:
        found = (
            selectors.models_for_tenant(tenant=self.tenant).filter(name=self.kwargs["name"]).first()
        )
        if found is None:
            raise Http404("No such model.")
        return found


class ModelListApi(TenantScopedMixin, generics.ListAPIView[RegisteredModel]):
    serializer_class = ModelOutputSerializer

    def get_queryset(self) -> Any:
        return selectors.models_for_tenant(tenant=self.tenant)


class ModelDetailApi(ModelScopedMixin, generics.GenericAPIView[RegisteredModel]):
    serializer_class = ModelOutputSerializer

    def get(self, request: Request, tenant: str, name: str) -> Response:
        return Response(ModelOutputSerializer(self.get_model()).data)


class ModelVersionListApi(ModelScopedMixin, generics.ListAPIView[ModelVersion]):
    serializer_class = ModelVersionOutputSerializer

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return ModelVersion.objects.none()
        return selectors.versions_of_model(model=self.get_model())


class ModelVersionDetailApi(ModelScopedMixin, generics.GenericAPIView[ModelVersion]):
    serializer_class = ModelVersionOutputSerializer

    def get_version(self) -> ModelVersion:
        number = self.kwargs["number"]
        version = selectors.versions_of_model(model=self.get_model()).filter(number=number).first()
        if version is None:
            raise Http404("No such version.")
        return version

    def get(self, request: Request, tenant: str, name: str, number: int) -> Response:
        return Response(ModelVersionOutputSerializer(self.get_version()).data)


class ModelVersionExportApi(ModelVersionDetailApi):
    """The version as a standalone model for serving elsewhere: an adapter merged into its
    base's weights (a full model as it is), a tar with its sha256. Any member may export."""

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "X-Content-SHA256",
                str,
                OpenApiParameter.HEADER,
                response=[200],
                description="sha256 of the tar",
            ),
        ],
        responses={
            (200, "application/x-tar"): OpenApiResponse(
                OpenApiTypes.BINARY,
                description="A tar of the standalone model (config.json, model.safetensors, "
                "tokenizer, labels.json; for an adapter also head.safetensors, "
                "workbench_export.json and a README with the recipe).",
            ),
            409: OpenApiResponse(
                ErrorSerializer,
                description="The export cannot be built: this host lacks the base weights "
                "(`base_unavailable`) or holds other ones than the adapter's (`base_mismatch`), "
                "or the artifact store lacks the version's bytes (`artifact_missing`, "
                "`artifact_mismatch`).",
            ),
        },
    )
    def get(self, request: Request, tenant: str, name: str, number: int) -> Any:
        version = self.get_version()
        key, sha256, size = services.version_export(version)
        response = StreamingHttpResponse(
            get_store().iter_bytes(key), content_type="application/x-tar"
        )
        filename = f"{version.registered_model.name}-v{version.number}-merged.tar"
        response["Content-Disposition"] = f'attachment; filename="{filename.replace(chr(34), "")}"'
        response["Content-Length"] = str(size)
        response["ETag"] = f'"{sha256}"'
        response["X-Content-SHA256"] = sha256
        return response
