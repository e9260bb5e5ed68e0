from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from django.http import Http404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import exceptions, generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.errors import ServiceUnavailable
from apps.datasets.api import download_response
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.selectors import datasets_for_tenant, version_lookup, versions_for_tenant
from apps.notebooks import grants, selectors, services
from apps.notebooks.hub import public_url
from apps.notebooks.models import DataAccessRequest, NotebookServer
from apps.tenants.auth import request_via
from apps.tenants.models import Role
from apps.tenants.scoping import TenantScopedMixin

MAX_DATASETS_PER_NOTEBOOK = 20

# --- data access requests ---------------------------------------------------------------


class AccessRequestOutputSerializer(serializers.ModelSerializer[DataAccessRequest]):
    dataset = serializers.CharField(source="dataset_id", read_only=True)
    dataset_name = serializers.CharField(source="dataset.name", read_only=True)
    dataset_version = serializers.CharField(
        source="dataset_version_id", read_only=True, allow_null=True
    )
    version = serializers.IntegerField(
        source="dataset_version.number", read_only=True, allow_null=True, default=None
    )
    requested_by = serializers.SlugRelatedField(slug_field="username", read_only=True)  # type: ignore[var-annotated]
    decided_by = serializers.SlugRelatedField(slug_field="username", read_only=True)  # type: ignore[var-annotated]

    class Meta:
        model = DataAccessRequest
        fields = [
            "id",
            "dataset",
            "dataset_name",
            "dataset_version",
            "version",
            "purpose",
            "status",
            "requested_by",
            "decided_by",
            "decided_at",
            "comment",
            "expires_at",
            "created_at",
        ]


class AccessRequestInputSerializer(serializers.Serializer[Any]):
    dataset = serializers.CharField(help_text="dataset id")
    version = serializers.CharField(
        required=False,
        allow_null=True,
        default=None,
        help_text="a version number or id; empty: every version of the dataset",
    )
    purpose = serializers.CharField(min_length=5, max_length=2000)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        tenant = self.context["tenant"]
        dataset: Dataset | None = (
            datasets_for_tenant(tenant=tenant).filter(pk=attrs["dataset"]).first()
        )
        if dataset is None:  # unknown and other tenants' ids read the same
            raise serializers.ValidationError({"dataset": ["No such dataset."]})
        attrs["dataset"] = dataset
        ref = attrs.pop("version")
        attrs["dataset_version"] = None
        if ref not in (None, ""):
            found = version_lookup(dataset=dataset, ref=str(ref))
            if found is None:
                raise serializers.ValidationError({"version": ["No such version."]})
            attrs["dataset_version"] = found
        return attrs


class AccessGrantSerializer(serializers.Serializer[Any]):
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=5000)
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True, default=None, help_text="empty: until revoked"
    )


class AccessDecisionSerializer(serializers.Serializer[Any]):
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=5000)


class AccessRequestListCreateApi(TenantScopedMixin, generics.ListAPIView[DataAccessRequest]):
    """Reviewers and admins see every request of the tenant; others their own."""

    serializer_class = AccessRequestOutputSerializer
    filterset_fields = ["status", "dataset"]

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return DataAccessRequest.objects.none()
        mine_only = not self.access.allows(Role.REVIEWER)
        return selectors.access_requests_for(
            tenant=self.tenant, user=self.request.user if mine_only else None
        )

    @extend_schema(
        request=AccessRequestInputSerializer, responses={201: AccessRequestOutputSerializer}
    )
    def post(self, request: Request, tenant: str) -> Response:
        data = AccessRequestInputSerializer(data=request.data, context={"tenant": self.tenant})
        data.is_valid(raise_exception=True)
        created = grants.access_request_create(
            actor=request.user, tenant=self.tenant, via=request_via(request), **data.validated_data
        )
        return Response(AccessRequestOutputSerializer(created).data, status=status.HTTP_201_CREATED)


class AccessRequestScopedMixin(TenantScopedMixin):
    kwargs: dict[str, Any]
    request: Any

    def get_access_request(self) -> DataAccessRequest:
        mine_only = not self.access.allows(Role.REVIEWER)
        found = (
            selectors.access_requests_for(
                tenant=self.tenant, user=self.request.user if mine_only else None
            )
            .filter(pk=self.kwargs["request_id"])
            .first()
        )
        if found is None:
            raise Http404("No such access request.")
        return found


class AccessRequestDetailApi(AccessRequestScopedMixin, generics.GenericAPIView[DataAccessRequest]):
    serializer_class = AccessRequestOutputSerializer

    def get(self, request: Request, tenant: str, request_id: str) -> Response:
        return Response(AccessRequestOutputSerializer(self.get_access_request()).data)


class AccessRequestDecisionApi(
    AccessRequestScopedMixin, generics.GenericAPIView[DataAccessRequest]
):
    """POST a decision on one request (reviewers and admins): the subclass names it."""

    serializer_class = AccessRequestOutputSerializer
    required_roles = {"POST": Role.REVIEWER}
    input_serializer: type[serializers.Serializer[Any]] = AccessDecisionSerializer
    decide: Callable[..., DataAccessRequest]

    def post(self, request: Request, tenant: str, request_id: str) -> Response:
        data = self.input_serializer(data=request.data)
        data.is_valid(raise_exception=True)
        decided = type(self).decide(
            actor=request.user,
            request=self.get_access_request(),
            via=request_via(request),
            **data.validated_data,
        )
        return Response(AccessRequestOutputSerializer(decided).data)


@extend_schema_view(post=extend_schema(request=AccessGrantSerializer))
class AccessRequestGrantApi(AccessRequestDecisionApi):
    input_serializer = AccessGrantSerializer
    decide = grants.access_request_grant


@extend_schema_view(post=extend_schema(request=AccessDecisionSerializer))
class AccessRequestDenyApi(AccessRequestDecisionApi):
    decide = grants.access_request_deny


@extend_schema_view(post=extend_schema(request=AccessDecisionSerializer))
class AccessRequestRevokeApi(AccessRequestDecisionApi):
    decide = grants.access_request_revoke


# --- granted data (what a notebook reads) -----------------------------------------------


class GrantedVersionSerializer(serializers.ModelSerializer[DatasetVersion]):
    dataset = serializers.CharField(source="dataset_id", read_only=True)
    dataset_name = serializers.CharField(source="dataset.name", read_only=True)
    label_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = DatasetVersion
        fields = [
            "id",
            "dataset",
            "dataset_name",
            "number",
            "sha256",
            "size_bytes",
            "format",
            "text_column",
            "label_column",
            "rows",
            "label_count",
            "documents_format",
            "documents_sha256",
            "documents_size_bytes",
            "documents_count",
            "profile",
        ]


class GrantedDataListApi(TenantScopedMixin, generics.ListAPIView[DatasetVersion]):
    """The dataset versions the caller holds a grant for: all a notebook may read."""

    serializer_class = GrantedVersionSerializer

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return DatasetVersion.objects.none()
        return selectors.granted_versions(tenant=self.tenant, user=self.request.user)


class GrantedDataDownloadApi(TenantScopedMixin, generics.GenericAPIView[DatasetVersion]):
    serializer_class = GrantedVersionSerializer
    documents = False  # the version's pairs file, or (a retrieval version's) knowledge base

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request: Request, tenant: str, version_id: str) -> Any:
        version = versions_for_tenant(tenant=self.tenant).filter(pk=version_id).first()
        if version is None:
            raise Http404("No such dataset version.")
        if selectors.grant_for(tenant=self.tenant, user=request.user, version=version) is None:
            raise exceptions.PermissionDenied(
                f"You have no access grant for '{version.dataset.name}' v{version.number} "
                f"({version.pk}): request access and wait for a reviewer to grant it."
            )
        if self.documents and not version.documents_storage_key:
            raise Http404("This version has no documents file (only retrieval versions do).")
        return download_response(version, documents=self.documents)


class GrantedDataDocumentsDownloadApi(GrantedDataDownloadApi):
    """A granted retrieval version's knowledge base."""

    documents = True


# --- notebook servers -------------------------------------------------------------------


class NotebookOutputSerializer(serializers.ModelSerializer[NotebookServer]):
    url = serializers.SerializerMethodField(help_text="the server in JupyterHub, once running")
    datasets = serializers.SerializerMethodField()
    age_seconds = serializers.SerializerMethodField()
    idle_seconds = serializers.SerializerMethodField()

    class Meta:
        model = NotebookServer
        fields = [
            "id",
            "status",
            "url",
            "server_name",
            "datasets",
            "stop_reason",
            "error",
            "created_at",
            "ready_at",
            "last_activity",
            "stopped_at",
            "age_seconds",
            "idle_seconds",
        ]

    def get_url(self, server: NotebookServer) -> str | None:
        return public_url(server)

    def get_datasets(self, server: NotebookServer) -> list[dict[str, Any]]:
        return [
            {"id": v.pk, "dataset": v.dataset_id, "name": v.dataset.name, "number": v.number}
            for v in server.datasets.all()
        ]

    def get_age_seconds(self, server: NotebookServer) -> int:
        end = server.stopped_at or timezone.now()
        return int((end - server.created_at).total_seconds())

    def get_idle_seconds(self, server: NotebookServer) -> int | None:
        if not server.active or server.last_activity is None:
            return None
        return max(0, int((timezone.now() - server.last_activity).total_seconds()))


class TenantVersionsField(serializers.ListField):
    """Dataset version ids, each looked up inside the request's tenant only."""

    child = serializers.CharField()

    def to_internal_value(self, data: Any) -> list[DatasetVersion]:
        ids = list(dict.fromkeys(super().to_internal_value(data)))
        found = {
            v.pk: v for v in versions_for_tenant(tenant=self.context["tenant"]).filter(pk__in=ids)
        }
        missing = [i for i in ids if i not in found]
        if missing:  # unknown and other tenants' ids read the same
            raise serializers.ValidationError([f"{i}: no such dataset version." for i in missing])
        return [found[i] for i in ids]


class NotebookInputSerializer(serializers.Serializer[Any]):
    datasets = TenantVersionsField(
        required=False, default=list, max_length=MAX_DATASETS_PER_NOTEBOOK
    )


def _refresh(request: Request) -> None:
    # The hub owns the servers: bring the caller's rows up to date before answering. A hub
    # that does not answer leaves the last known state, which the page still shows.
    with contextlib.suppress(ServiceUnavailable):
        services.notebooks_sync(user=request.user)


class NotebookListCreateApi(TenantScopedMixin, generics.ListAPIView[NotebookServer]):
    """The caller's notebook servers in this tenant."""

    serializer_class = NotebookOutputSerializer
    filterset_fields = ["status"]

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return NotebookServer.objects.none()
        return selectors.notebooks_of(tenant=self.tenant, user=self.request.user)

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        _refresh(request)
        return super().list(request, *args, **kwargs)

    @extend_schema(request=NotebookInputSerializer, responses={202: NotebookOutputSerializer})
    def post(self, request: Request, tenant: str) -> Response:
        data = NotebookInputSerializer(data=request.data, context={"tenant": self.tenant})
        data.is_valid(raise_exception=True)
        server = services.notebook_start(
            actor=request.user,
            tenant=self.tenant,
            datasets=data.validated_data["datasets"],
            via=request_via(request),
        )
        server = self.get_queryset().get(pk=server.pk)
        return Response(NotebookOutputSerializer(server).data, status=status.HTTP_202_ACCEPTED)


class NotebookDetailApi(TenantScopedMixin, generics.GenericAPIView[NotebookServer]):
    serializer_class = NotebookOutputSerializer
    kwargs: dict[str, Any]

    def get_server(self) -> NotebookServer:
        found = (
            selectors.notebooks_of(tenant=self.tenant, user=self.request.user)
            .filter(pk=self.kwargs["notebook_id"])
            .first()
        )
        if found is None:
            raise Http404("No such notebook server.")
        return found

    def get(self, request: Request, tenant: str, notebook_id: str) -> Response:
        self.get_server()  # 404 before anything else
        _refresh(request)
        return Response(NotebookOutputSerializer(self.get_server()).data)

    @extend_schema(request=None, responses={200: NotebookOutputSerializer})
    def delete(self, request: Request, tenant: str, notebook_id: str) -> Response:
        services.notebook_stop(
            actor=request.user, server=self.get_server(), via=request_via(request)
        )
        return Response(NotebookOutputSerializer(self.get_server()).data)
