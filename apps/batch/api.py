"""Batch predictions over REST: ``/api/v1/tenants/{tenant}/batch-predictions/``."""

from __future__ import annotations

from typing import Any

from django.http import Http404, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.batch import services
from apps.batch.models import BatchPrediction, BatchStatus, OutputFormat
from apps.core.artifacts import get_store
from apps.core.errors import DomainError
from apps.datasets.selectors import versions_for_tenant
from apps.registry.models import ModelVersion
from apps.tenants.auth import request_via
from apps.tenants.models import Role
from apps.tenants.scoping import TenantScopedMixin
from worker import autocomplete_text as limits

# What an output downloads as, by its format.
CONTENT_TYPES: dict[str, str] = {
    OutputFormat.JSONL: "application/x-ndjson",
    OutputFormat.CSV: "text/csv",
    OutputFormat.NPY: "application/x-npy",
    OutputFormat.PARQUET: "application/vnd.apache.parquet",
}


class BatchOutputSerializer(serializers.ModelSerializer[BatchPrediction]):
    model = serializers.CharField(source="model_version.registered_model.name", read_only=True)
    version = serializers.IntegerField(source="model_version.number", read_only=True)
    rows_per_s = serializers.FloatField(read_only=True, allow_null=True)
    eta_seconds = serializers.FloatField(read_only=True, allow_null=True)
    progress = serializers.SerializerMethodField()
    output_url = serializers.SerializerMethodField()

    class Meta:
        model = BatchPrediction
        fields = [
            "id", "status", "model_version", "model", "version", "model_kind",
            "artifact_sha256", "dataset_version", "text_column", "context_column",
            "output_format", "top_k", "role", "max_tokens", "completions", "dim", "chunk_rows",
            "rows_total", "rows_done", "chunks_done", "progress", "rows_per_s", "eta_seconds",
            "label_counts", "preview", "output_sha256", "output_size_bytes", "output_url",
            "registered_version", "cancel_requested", "attempt", "error", "created_at",
            "started_at", "finished_at",
        ]  # fmt: skip

    def get_progress(self, job: BatchPrediction) -> float:
        """Share of the rows scored, 0 to 1."""
        return round(job.rows_done / job.rows_total, 4) if job.rows_total else 0.0

    def get_output_url(self, job: BatchPrediction) -> str | None:
        if job.status != BatchStatus.SUCCEEDED:
            return None
        return f"/api/v1/tenants/{job.tenant.slug}/batch-predictions/{job.pk}/output"


class BatchInputSerializer(serializers.Serializer[Any]):
    model_version = serializers.CharField(required=False, allow_blank=True, default="")
    model = serializers.CharField(
        required=False, allow_blank=True, default="", help_text="a model's name, with environment"
    )
    environment = serializers.ChoiceField(
        choices=["production", "staging"], required=False, default="production"
    )
    dataset_version = serializers.CharField()
    text_column = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="the texts (autocomplete: the replies' prefixes); default: the version's",
    )
    output_format = serializers.ChoiceField(
        choices=OutputFormat.choices,
        required=False,
        default="",
        allow_blank=True,
        help_text="classifier and autocomplete: jsonl (default) or csv; embedding: npy "
        "(default), parquet or jsonl",
    )
    top_k = serializers.IntegerField(
        required=False,
        default=3,
        min_value=1,
        max_value=services.MAX_TOP_K,
        help_text="classifier: the most likely labels kept per row",
    )
    role = serializers.ChoiceField(
        choices=["query", "document"],
        required=False,
        default="",
        allow_blank=True,
        help_text="embedding: which encoder embeds the texts (default query, as the embed "
        "endpoint's)",
    )
    context_column = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        default=None,
        help_text="autocomplete: the customer messages the replies answer (default: a reply "
        "dataset's context column; empty: none)",
    )
    max_tokens = serializers.IntegerField(
        required=False,
        default=limits.MAX_TOKENS_DEFAULT,
        min_value=1,
        max_value=limits.MAX_TOKENS_LIMIT,
        help_text="autocomplete: tokens per completion at most",
    )
    completions = serializers.IntegerField(
        required=False,
        default=1,
        min_value=1,
        max_value=limits.N_LIMIT,
        help_text="autocomplete: completions per row, best first (greedy, as the complete "
        "endpoint's n)",
    )


class RegisterInputSerializer(serializers.Serializer[Any]):
    dataset_name = serializers.CharField(
        max_length=100, help_text="a sample dataset's name (created when the tenant has none)"
    )


def _jobs(tenant: Any) -> Any:
    return BatchPrediction.objects.filter(tenant=tenant).select_related(
        "tenant", "model_version__registered_model"
    )


class BatchListCreateApi(TenantScopedMixin, generics.ListAPIView[BatchPrediction]):
    """The tenant's batch predictions, newest first; POST queues one (202): a model
    version (or a model and environment) scores every row of a dataset version on a
    worker, chunk by chunk, resumable."""

    serializer_class = BatchOutputSerializer
    filterset_fields = ["status", "model_version", "dataset_version"]
    required_roles = {"POST": Role.SCIENTIST}

    def get_queryset(self) -> Any:
        return _jobs(self.tenant)

    @extend_schema(request=BatchInputSerializer, responses={202: BatchOutputSerializer})
    def post(self, request: Request, tenant: str) -> Response:
        data = BatchInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = data.validated_data
        # An id of another tenant's reads as one that does not exist: 404, naming it.
        version = versions_for_tenant(tenant=self.tenant).filter(pk=fields["dataset_version"])
        dataset_version = version.first()
        if dataset_version is None:
            raise exceptions.NotFound("No such dataset version in this tenant.")
        if fields["model_version"]:
            model_version = (
                ModelVersion.objects.filter(
                    pk=fields["model_version"], registered_model__tenant=self.tenant
                )
                .select_related("registered_model")
                .first()
            )
            if model_version is None:
                raise exceptions.NotFound("No such model version in this tenant.")
        else:
            model_version = services.resolve_model_version(
                tenant=self.tenant, model=fields["model"], environment=fields["environment"]
            )
        job = services.batch_create(
            actor=request.user,
            tenant=self.tenant,
            model_version=model_version,
            dataset_version=dataset_version,
            text_column=fields["text_column"],
            output_format=fields["output_format"],
            top_k=fields["top_k"],
            role=fields["role"],
            context_column=fields["context_column"],
            max_tokens=fields["max_tokens"],
            completions=fields["completions"],
            via=request_via(request),
        )
        return Response(
            BatchOutputSerializer(_jobs(self.tenant).get(pk=job.pk)).data,
            status=status.HTTP_202_ACCEPTED,
        )


class _OneJob(TenantScopedMixin, generics.GenericAPIView[BatchPrediction]):
    serializer_class = BatchOutputSerializer
    kwargs: dict[str, Any]

    def get_queryset(self) -> Any:
        return _jobs(self.tenant)

    def job(self) -> BatchPrediction:
        found = _jobs(self.tenant).filter(pk=self.kwargs["batch_id"]).first()
        if found is None:
            raise Http404("No such batch prediction.")
        return found


class BatchDetailApi(_OneJob):
    def get(self, request: Request, tenant: str, batch_id: str) -> Response:
        return Response(BatchOutputSerializer(self.job()).data)


class BatchCancelApi(_OneJob):
    required_roles = {"POST": Role.SCIENTIST}

    @extend_schema(request=None, responses={200: BatchOutputSerializer})
    def post(self, request: Request, tenant: str, batch_id: str) -> Response:
        """A queued job is cancelled at once; a running one after its current chunk
        (``cancel_requested`` until then). 409 once it has finished."""
        job = services.batch_cancel(actor=request.user, job=self.job(), via=request_via(request))
        return Response(BatchOutputSerializer(_jobs(self.tenant).get(pk=job.pk)).data)


class BatchOutputApi(_OneJob):
    @extend_schema(
        responses={
            (200, media): OpenApiResponse(
                OpenApiTypes.BINARY,
                description="the output file (JSON lines, CSV, .npy or Parquet, as the "
                "job's output_format says); its sha256 in the X-Content-SHA256 header",
            )
            for media in CONTENT_TYPES.values()
        }
    )
    def get(self, request: Request, tenant: str, batch_id: str) -> Any:
        """The output file; 409 until the job has succeeded."""
        job = self.job()
        if job.status != BatchStatus.SUCCEEDED:
            raise DomainError(
                f"The batch prediction is {job.status}; its output exists once it succeeded.",
                code="no_output",
                status=job.status,
            )
        response = StreamingHttpResponse(
            get_store().iter_bytes(job.output_key),
            content_type=CONTENT_TYPES.get(job.output_format, "application/octet-stream"),
        )
        response["Content-Length"] = str(job.output_size_bytes)
        response["X-Content-SHA256"] = job.output_sha256
        response["Content-Disposition"] = f'attachment; filename="{job.pk}.{job.output_format}"'
        return response


class BatchRegisterApi(_OneJob):
    required_roles = {"POST": Role.REVIEWER}

    @extend_schema(request=RegisterInputSerializer, responses={201: BatchOutputSerializer})
    def post(self, request: Request, tenant: str, batch_id: str) -> Response:
        """Make the output a new version of a sample dataset, for review and labelling: a
        classifier's as text and predicted label, an autocomplete model's as replies
        (prefix and completion) with their context. Reviewers and admins write sample
        sets; an embedding job's vectors are no dataset (409 ``not_registrable``)."""
        data = RegisterInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.batch_register(
            actor=request.user,
            job=self.job(),
            dataset_name=data.validated_data["dataset_name"],
            via=request_via(request),
        )
        return Response(BatchOutputSerializer(self.job()).data, status=status.HTTP_201_CREATED)
