from __future__ import annotations

from typing import Any

from django.http import Http404, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, generics, parsers, permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.api import default_permissions_and
from apps.core.artifacts import get_store
from apps.core.uploads import HashedUploadedFile
from apps.datasets import selectors, services
from apps.datasets.filters import DatasetFilter
from apps.datasets.models import (
    Dataset,
    DatasetKind,
    DatasetVersion,
    Task,
    default_columns,
    writer_role,
)
from apps.tenants.auth import request_via
from apps.tenants.scoping import TenantAccess, TenantScopedMixin, role_error


class DatasetOutputSerializer(serializers.ModelSerializer[Dataset]):
    created_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True
    )
    version_count = serializers.IntegerField(read_only=True, default=0)
    latest_version = serializers.IntegerField(read_only=True, allow_null=True, default=None)

    class Meta:
        model = Dataset
        fields = [
            "id",
            "name",
            "kind",
            "task",
            "domain",
            "description",
            "created_by",
            "created_at",
            "version_count",
            "latest_version",
        ]


class DatasetInputSerializer(serializers.Serializer[Any]):
    name = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$",
        max_length=100,
        error_messages={"invalid": "Use letters, digits, spaces, '.', '_' and '-'."},
    )
    kind = serializers.ChoiceField(choices=DatasetKind.choices)
    task = serializers.ChoiceField(choices=Task.choices, default=Task.TEXT_CLASSIFICATION)
    domain = serializers.RegexField(
        r"^[a-z0-9-]{0,50}$",
        required=False,
        allow_blank=True,
        default="",
        error_messages={"invalid": "Use lowercase letters, digits and '-'."},
    )
    description = serializers.CharField(
        required=False, allow_blank=True, default="", max_length=5000
    )


class DatasetUpdateSerializer(serializers.Serializer[Any]):
    description = serializers.CharField(required=False, allow_blank=True, max_length=5000)
    domain = serializers.RegexField(r"^[a-z0-9-]{0,50}$", required=False, allow_blank=True)


class DatasetVersionOutputSerializer(serializers.ModelSerializer[DatasetVersion]):
    dataset = serializers.CharField(source="dataset_id", read_only=True)
    created_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True
    )
    label_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = DatasetVersion
        fields = [
            "id",
            "dataset",
            "number",
            "sha256",
            "size_bytes",
            "format",
            "text_column",
            "label_column",
            "rows",
            "labels",
            "label_count",
            "duplicate_texts",
            "preview",
            "original_filename",
            "documents_format",
            "documents_sha256",
            "documents_size_bytes",
            "documents_original_filename",
            "documents_count",
            "documents_preview",
            "profile",
            "created_by",
            "created_at",
        ]
        extra_kwargs = {
            "text_column": {
                "help_text": "the text column: a retrieval version's query column, a "
                "text-generation version's reply column"
            },
            "label_column": {
                "help_text": "the label column: a retrieval version's document-id column; a "
                'text-generation version\'s context column, "" when it has none'
            },
            "labels": {"help_text": "label -> row count ({} for retrieval and text-generation)"},
            "preview": {
                "help_text": "the first rows, as {text, label}; text-generation: {text, context}"
            },
        }


class DatasetVersionUploadSerializer(serializers.Serializer[Any]):
    file = serializers.FileField(
        help_text="CSV (with a header) or JSON lines, UTF-8; for a retrieval dataset the "
        "pairs (a query column and a document-id column); for a text-generation dataset the "
        "replies (a text column and optionally a context column: the message each answers)"
    )
    documents = serializers.FileField(
        required=False,
        allow_null=True,
        default=None,
        help_text="retrieval datasets only, and required there: the knowledge base, CSV or "
        "JSON lines with the columns id, text and optionally title",
    )
    text_column = serializers.CharField(
        required=False,
        max_length=100,
        help_text="default 'text'; for a retrieval dataset the query column, default "
        "'query'; for a text-generation dataset the reply column",
    )
    label_column = serializers.CharField(
        required=False,
        max_length=100,
        help_text="default 'label'; for a retrieval dataset the document-id column, "
        "default 'document_id'; not for a text-generation dataset (see context_column)",
    )
    context_column = serializers.CharField(
        required=False,
        max_length=100,
        help_text="text-generation datasets only: the column holding the message each reply "
        "answers; default 'context', taken when the file has it (without one the replies "
        "have no context). A named column must exist. A blank context is a reply without one.",
    )
    format = serializers.ChoiceField(
        choices=DatasetVersion.Format.choices,
        required=False,
        allow_null=True,
        default=None,
        help_text="default: from the file name or content",
    )
    documents_format = serializers.ChoiceField(
        choices=DatasetVersion.Format.choices,
        required=False,
        allow_null=True,
        default=None,
        help_text="the documents file's; default: from its name or content",
    )


def require_writer(access: TenantAccess, kind: str) -> None:
    """403 unless the caller may write datasets of ``kind`` (golden and sample sets:
    reviewers and admins only, since the promotion gates measure against them)."""
    needed = writer_role(kind)
    if not access.allows(needed):
        raise exceptions.PermissionDenied(
            f"{role_error(access, needed)} {kind.capitalize()} datasets decide promotions, "
            "so only reviewers and admins change them."
        )


class DatasetListCreateApi(TenantScopedMixin, generics.ListAPIView[Dataset]):
    serializer_class = DatasetOutputSerializer
    filterset_class = DatasetFilter

    def get_queryset(self) -> Any:
        return selectors.datasets_for_tenant(tenant=self.tenant)

    @extend_schema(request=DatasetInputSerializer, responses={201: DatasetOutputSerializer})
    def post(self, request: Request, tenant: str) -> Response:
        data = DatasetInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        require_writer(self.access, data.validated_data["kind"])
        dataset = services.dataset_create(
            actor=request.user, tenant=self.tenant, via=request_via(request), **data.validated_data
        )
        dataset = selectors.datasets_for_tenant(tenant=self.tenant).get(pk=dataset.pk)
        return Response(DatasetOutputSerializer(dataset).data, status=status.HTTP_201_CREATED)


class DatasetScopedMixin(TenantScopedMixin):
    kwargs: dict[str, Any]

    def get_dataset(self) -> Dataset:
        dataset = (
            selectors.datasets_for_tenant(tenant=self.tenant)
            .filter(pk=self.kwargs["dataset_id"])
            .first()
        )
        if dataset is None:
            raise Http404("No such dataset.")
        return dataset


class DatasetDetailApi(DatasetScopedMixin, generics.GenericAPIView[Dataset]):
    serializer_class = DatasetOutputSerializer

    def get(self, request: Request, tenant: str, dataset_id: str) -> Response:
        return Response(DatasetOutputSerializer(self.get_dataset()).data)

    @extend_schema(request=DatasetUpdateSerializer, responses=DatasetOutputSerializer)
    def patch(self, request: Request, tenant: str, dataset_id: str) -> Response:
        dataset = self.get_dataset()
        require_writer(self.access, dataset.kind)
        data = DatasetUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.dataset_update(
            actor=request.user, dataset=dataset, via=request_via(request), **data.validated_data
        )
        return Response(DatasetOutputSerializer(self.get_dataset()).data)

    def delete(self, request: Request, tenant: str, dataset_id: str) -> Response:
        dataset = self.get_dataset()
        require_writer(self.access, dataset.kind)
        services.dataset_delete(actor=request.user, dataset=dataset, via=request_via(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class DatasetVersionListCreateApi(DatasetScopedMixin, generics.ListAPIView[DatasetVersion]):
    serializer_class = DatasetVersionOutputSerializer
    parser_classes = [parsers.MultiPartParser, parsers.FormParser]

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return DatasetVersion.objects.none()
        return selectors.versions_of(dataset=self.get_dataset())

    @extend_schema(
        request=DatasetVersionUploadSerializer,
        responses={201: DatasetVersionOutputSerializer, 200: DatasetVersionOutputSerializer},
    )
    def post(self, request: Request, tenant: str, dataset_id: str) -> Response:
        dataset = self.get_dataset()
        require_writer(self.access, dataset.kind)  # before the body is read
        return _upload_version(request, dataset)


def _upload_version(request: Request, dataset: Dataset) -> Response:
    data = DatasetVersionUploadSerializer(data=request.data)
    try:
        data.is_valid(raise_exception=True)
        upload = data.validated_data["file"]
        documents = data.validated_data["documents"]
        for name, uploaded in (("file", upload), ("documents", documents)):
            if uploaded is not None and not isinstance(uploaded, HashedUploadedFile):
                raise serializers.ValidationError(
                    {name: ["Upload the file as multipart/form-data."]}
                )
        text_default, label_default = default_columns(dataset.task)
        fields = data.validated_data
        if dataset.task == Task.TEXT_GENERATION and "label_column" in fields:
            raise serializers.ValidationError(
                {
                    "label_column": [
                        "A text-generation dataset has no label column: name the column of "
                        "the messages the replies answer with 'context_column'."
                    ]
                }
            )
        # None: the default, "context" where the file has it (the ingest decides).
        context_column = fields.get("context_column", "").strip() or None
        result = services.dataset_version_create(
            actor=request.user,
            dataset=dataset,
            path=upload.path,
            sha256=upload.sha256,
            size_bytes=upload.size or 0,
            filename=upload.name or "",
            fmt=data.validated_data["format"],
            text_column=data.validated_data.get("text_column", "").strip() or text_default,
            label_column=data.validated_data.get("label_column", "").strip() or label_default,
            context_column=context_column,
            first_nul=upload.first_nul,
            documents=services.UploadedFile(
                path=documents.path,
                sha256=documents.sha256,
                size_bytes=documents.size or 0,
                filename=documents.name or "",
                first_nul=documents.first_nul,
                fmt=data.validated_data["documents_format"],
            )
            if documents is not None
            else None,
            via=request_via(request),
        )
    finally:
        for name in request.FILES:
            for uploaded in request.FILES.getlist(name):
                uploaded.close()
    return Response(
        DatasetVersionOutputSerializer(result.version).data,
        status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
    )


class DatasetVersionDetailApi(DatasetScopedMixin, generics.GenericAPIView[DatasetVersion]):
    serializer_class = DatasetVersionOutputSerializer

    def get_version(self) -> DatasetVersion:
        version = selectors.version_lookup(dataset=self.get_dataset(), ref=self.kwargs["version"])
        if version is None:
            raise Http404("No such version.")
        return version

    def get(self, request: Request, tenant: str, dataset_id: str, version: str) -> Response:
        return Response(DatasetVersionOutputSerializer(self.get_version()).data)


class DatasetVersionDownloadApi(DatasetVersionDetailApi):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request: Request, tenant: str, dataset_id: str, version: str) -> Any:
        return download_response(self.get_version())


class DatasetVersionDocumentsDownloadApi(DatasetVersionDetailApi):
    """A retrieval version's knowledge base (404 for a version that has none)."""

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request: Request, tenant: str, dataset_id: str, version: str) -> Any:
        found = self.get_version()
        if not found.documents_storage_key:
            raise Http404("This version has no documents file (only retrieval versions do).")
        return download_response(found, documents=True)


def download_response(found: DatasetVersion, *, documents: bool = False) -> StreamingHttpResponse:
    """A version's bytes (or its knowledge base's), streamed from the artifact store, with
    their sha256."""
    store = get_store()
    key, fmt, size, sha256 = (
        (
            found.documents_storage_key,
            found.documents_format,
            found.documents_size_bytes,
            found.documents_sha256,
        )
        if documents
        else (found.storage_key, found.format, found.size_bytes, found.sha256)
    )
    response = StreamingHttpResponse(store.iter_bytes(key), content_type="application/octet-stream")
    extension = "jsonl" if fmt == DatasetVersion.Format.JSONL else "csv"
    suffix = "-documents" if documents else ""
    filename = f"{found.dataset.name}-v{found.number}{suffix}.{extension}".replace('"', "")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["Content-Length"] = str(size)
    response["ETag"] = f'"{sha256}"'
    response["X-Content-SHA256"] = sha256
    return response


# --- shared domain golden sets (staff) --------------------------------------------------


class SharedDatasetInputSerializer(serializers.Serializer[Any]):
    name = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$", max_length=100)
    domain = serializers.RegexField(
        r"^[a-z0-9-]{1,50}$", help_text="the vertical whose tenants are evaluated on it"
    )
    task = serializers.ChoiceField(choices=Task.choices, default=Task.TEXT_CLASSIFICATION)
    description = serializers.CharField(
        required=False, allow_blank=True, default="", max_length=5000
    )


class SharedDatasetListCreateApi(generics.ListAPIView[Dataset]):
    """Golden sets owned by no tenant, one domain vertical each; staff manage them and every
    tenant of that domain is evaluated on them (tenants cannot read them)."""

    serializer_class = DatasetOutputSerializer
    permission_classes = default_permissions_and(permissions.IsAdminUser)

    def get_queryset(self) -> Any:
        return selectors.shared_datasets()

    @extend_schema(request=SharedDatasetInputSerializer, responses={201: DatasetOutputSerializer})
    def post(self, request: Request) -> Response:
        data = SharedDatasetInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset = services.dataset_create(
            actor=request.user,
            tenant=None,
            kind=DatasetKind.GOLDEN,
            via=request_via(request),
            **data.validated_data,
        )
        return Response(
            DatasetOutputSerializer(selectors.shared_datasets().get(pk=dataset.pk)).data,
            status=status.HTTP_201_CREATED,
        )


class SharedDatasetVersionListCreateApi(generics.ListAPIView[DatasetVersion]):
    serializer_class = DatasetVersionOutputSerializer
    permission_classes = default_permissions_and(permissions.IsAdminUser)
    parser_classes = [parsers.MultiPartParser, parsers.FormParser]
    kwargs: dict[str, Any]

    def get_dataset(self) -> Dataset:
        dataset = selectors.shared_datasets().filter(pk=self.kwargs["dataset_id"]).first()
        if dataset is None:
            raise Http404("No such shared dataset.")
        return dataset

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return DatasetVersion.objects.none()
        return selectors.versions_of(dataset=self.get_dataset())

    @extend_schema(
        request=DatasetVersionUploadSerializer, responses={201: DatasetVersionOutputSerializer}
    )
    def post(self, request: Request, dataset_id: str) -> Response:
        return _upload_version(request, self.get_dataset())
