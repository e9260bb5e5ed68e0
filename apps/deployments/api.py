from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import Http404
from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.core.renderers import FastJSONRenderer
from apps.deployments import fleet, indexing, selectors, services
from apps.deployments.models import Deployment, EmbeddingRole, Environment, FleetAlert, Warmup
from apps.registry.models import ArtifactFormat
from apps.tenants.auth import request_via
from apps.tenants.models import Role
from apps.tenants.scoping import TenantScopedMixin


class WarmupOutputSerializer(serializers.ModelSerializer[Warmup]):
    class Meta:
        model = Warmup
        fields = [
            "id",
            "trigger",
            "ok",
            "samples",
            "mismatches",
            "latency_ms_p50",
            "latency_ms_max",
            "latency_budget_ms",
            "error",
            "started_at",
            "finished_at",
        ]


class AlertOutputSerializer(serializers.ModelSerializer[FleetAlert]):
    class Meta:
        model = FleetAlert
        fields = ["id", "kind", "message", "created_at", "resolved_at"]


class DeploymentOutputSerializer(serializers.ModelSerializer[Deployment]):
    model = serializers.CharField(source="model_version.registered_model.name", read_only=True)
    model_version = serializers.CharField(source="model_version_id", read_only=True)
    version = serializers.IntegerField(source="model_version.number", read_only=True)
    promotion = serializers.CharField(source="promotion_id", read_only=True, allow_null=True)
    replaces = serializers.CharField(source="replaces_id", read_only=True, allow_null=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)  # type: ignore[var-annotated]
    # Embedding deployments: the knowledge base and its index ("" / null for classifiers).
    corpus = serializers.CharField(source="corpus_id", read_only=True, allow_null=True)
    index_dataset_version = serializers.CharField(
        source="index_dataset_version_id", read_only=True, allow_null=True
    )
    staged_dataset_version = serializers.CharField(
        source="staged_dataset_version_id",
        read_only=True,
        allow_null=True,
        help_text="a reindex in progress: the knowledge base being indexed",
    )

    class Meta:
        model = Deployment
        fields = [
            "id",
            "model",
            "model_version",
            "version",
            "environment",
            "status",
            "artifact_sha256",
            "promotion",
            "replaces",
            "is_rollback",
            "standby",
            "replica_set",
            "failure",
            "created_by",
            "created_at",
            "warm_at",
            "retired_at",
            "last_warmup_at",
            "last_warmup_ms",
            "load_attempts",
            "degraded_at",
            "warmup_requested_at",
            "corpus",
            "index_sha256",
            "index_documents",
            "index_dataset_version",
            "staged_dataset_version",
            "staged_index_sha256",
            "index_error",
            "reindexed_at",
        ]


class DeploymentDetailSerializer(DeploymentOutputSerializer):
    warmups = serializers.SerializerMethodField()
    alerts = AlertOutputSerializer(many=True, read_only=True)

    class Meta(DeploymentOutputSerializer.Meta):
        fields = [*DeploymentOutputSerializer.Meta.fields, "warmups", "alerts"]

    @extend_schema_field(WarmupOutputSerializer(many=True))
    def get_warmups(self, deployment: Deployment) -> list[dict[str, Any]]:
        recent = deployment.warmups.all()[:20]
        return list(WarmupOutputSerializer(recent, many=True).data)


class DeploymentListApi(TenantScopedMixin, generics.ListAPIView[Deployment]):
    serializer_class = DeploymentOutputSerializer
    filterset_fields = ["environment", "status", "model_version"]
    queryset = Deployment.objects.none()

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return Deployment.objects.none()
        rows = selectors.deployments_for(self.tenant)
        model = self.request.query_params.get("model")
        return rows.filter(model_version__registered_model__name=model) if model else rows


class DeploymentScopedMixin(TenantScopedMixin):
    kwargs: dict[str, Any]

    def get_deployment(self) -> Deployment:
        found = selectors.deployments_for(self.tenant).filter(pk=self.kwargs["deployment_id"])
        deployment = found.first()
        if deployment is None:
            raise Http404("No such deployment.")
        return deployment


class DeploymentDetailApi(DeploymentScopedMixin, generics.GenericAPIView[Deployment]):
    serializer_class = DeploymentDetailSerializer

    def get(self, request: Request, tenant: str, deployment_id: str) -> Response:
        return Response(DeploymentDetailSerializer(self.get_deployment()).data)


class DeploymentWarmupApi(DeploymentScopedMixin, generics.GenericAPIView[Deployment]):
    """Re-warm a warm deployment now (202; the warm-up shows in the detail's ``warmups``)."""

    serializer_class = DeploymentOutputSerializer

    @extend_schema(request=None, responses={202: DeploymentOutputSerializer})
    def post(self, request: Request, tenant: str, deployment_id: str) -> Response:
        deployment = services.deployment_warmup_request(
            actor=request.user, deployment=self.get_deployment(), via=request_via(request)
        )
        return Response(
            DeploymentOutputSerializer(deployment).data, status=status.HTTP_202_ACCEPTED
        )


class DeploymentRollbackApi(DeploymentScopedMixin, generics.GenericAPIView[Deployment]):
    """Roll a warm deployment back to the version it replaced: returns the new deployment
    (202); the current one serves until it is warm."""

    serializer_class = DeploymentOutputSerializer
    required_roles = {"POST": Role.REVIEWER}

    @extend_schema(request=None, responses={202: DeploymentOutputSerializer})
    def post(self, request: Request, tenant: str, deployment_id: str) -> Response:
        rollback = services.deployment_rollback(
            actor=request.user, deployment=self.get_deployment(), via=request_via(request)
        )
        fresh = selectors.deployments_for(self.tenant).get(pk=rollback.pk)
        return Response(DeploymentOutputSerializer(fresh).data, status=status.HTTP_202_ACCEPTED)


class DeploymentRetireApi(DeploymentScopedMixin, generics.GenericAPIView[Deployment]):
    """Take a deployment's version off the fleet (it stops serving and is unloaded)."""

    serializer_class = DeploymentOutputSerializer
    required_roles = {"POST": Role.REVIEWER}

    @extend_schema(request=None, responses=DeploymentOutputSerializer)
    def post(self, request: Request, tenant: str, deployment_id: str) -> Response:
        retired = services.deployment_retire(
            actor=request.user, deployment=self.get_deployment(), via=request_via(request)
        )
        fresh = selectors.deployments_for(self.tenant).get(pk=retired.pk)
        return Response(DeploymentOutputSerializer(fresh).data)


class PredictInputSerializer(serializers.Serializer[Any]):
    inputs = serializers.ListField(
        child=serializers.CharField(
            allow_blank=False, trim_whitespace=False, max_length=settings.PREDICT_MAX_INPUT_CHARS
        ),
        min_length=1,
        max_length=settings.PREDICT_MAX_INPUTS,
    )
    environment = serializers.ChoiceField(
        choices=Environment.choices, default=Environment.PRODUCTION
    )


PredictOutputSerializer = inline_serializer(
    "PredictOutput",
    {
        "model_version": serializers.CharField(),
        "version": serializers.IntegerField(),
        "environment": serializers.CharField(),
        "outputs": serializers.ListField(
            child=inline_serializer(
                "PredictOutputItem",
                {"label": serializers.CharField(), "score": serializers.FloatField()},
            )
        ),
        "latency_ms": serializers.FloatField(),
    },
)


class ModelPredictApi(TenantScopedMixin, APIView):
    """Predict with the tenant's model as served by its environment's warm deployment.
    A model with no warm deployment is a 409 naming the latest deployment's status; one
    the fleet cannot serve right now (a degraded deployment, replicas gone or unreachable)
    is a quick 503 with ``Retry-After``."""

    renderer_classes = [FastJSONRenderer]  # the data plane's answers: see its module

    # Automation reads predictions with any role; a viewer token is enough.
    required_roles = {"POST": Role.VIEWER}

    @extend_schema(
        request=PredictInputSerializer,
        responses={
            200: PredictOutputSerializer,
            409: OpenApiResponse(
                description="The model has no warm deployment in that "
                "environment (`not_warm`, naming the latest status)."
            ),
            503: OpenApiResponse(
                description="No replica answered (`model_unavailable`): the "
                "fleet is recovering or unreachable; see `Retry-After`."
            ),
        },
    )
    def post(self, request: Request, tenant: str, name: str) -> Response:
        model = selectors.registered_model(tenant=self.tenant, name=name)
        if model is None:
            raise Http404("No such model.")
        data = PredictInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(
            fleet.predict(
                tenant=self.tenant,
                model=model,
                inputs=data.validated_data["inputs"],
                environment=data.validated_data["environment"],
            )
        )


class EmbedInputSerializer(serializers.Serializer[Any]):
    inputs = serializers.ListField(
        child=serializers.CharField(
            allow_blank=False, trim_whitespace=False, max_length=settings.PREDICT_MAX_INPUT_CHARS
        ),
        min_length=1,
        max_length=settings.PREDICT_MAX_INPUTS,
    )
    role = serializers.ChoiceField(choices=EmbeddingRole.choices, default=EmbeddingRole.QUERY)
    environment = serializers.ChoiceField(
        choices=Environment.choices, default=Environment.PRODUCTION
    )


EmbedOutputSerializer = inline_serializer(
    "EmbedOutput",
    {
        "embeddings": serializers.ListField(
            child=serializers.ListField(child=serializers.FloatField()),
            help_text="one L2-normalised vector per input, in order",
        ),
        "dim": serializers.IntegerField(),
        "role": serializers.CharField(),
        "model_version": serializers.CharField(),
        "version": serializers.IntegerField(),
        "environment": serializers.CharField(),
        "latency_ms": serializers.FloatField(),
    },
)


class SearchInputSerializer(serializers.Serializer[Any]):
    query = serializers.CharField(
        allow_blank=False, trim_whitespace=False, max_length=settings.PREDICT_MAX_INPUT_CHARS
    )
    k = serializers.IntegerField(min_value=1, max_value=100, default=5)
    environment = serializers.ChoiceField(
        choices=Environment.choices, default=Environment.PRODUCTION
    )


SearchOutputSerializer = inline_serializer(
    "SearchOutput",
    {
        "results": serializers.ListField(
            child=inline_serializer(
                "SearchResult",
                {
                    "document_id": serializers.CharField(),
                    "title": serializers.CharField(),
                    "score": serializers.FloatField(help_text="cosine similarity"),
                },
            ),
            help_text="best first",
        ),
        "k": serializers.IntegerField(),
        "index_sha256": serializers.CharField(),
        "dataset_version": serializers.CharField(
            allow_null=True, help_text="the knowledge base indexed"
        ),
        "model_version": serializers.CharField(),
        "version": serializers.IntegerField(),
        "environment": serializers.CharField(),
        "latency_ms": serializers.FloatField(),
    },
)

_EMBEDDING_ERRORS = {
    409: OpenApiResponse(
        description="Not an embedding model (`not_embedding`), or no warm deployment in "
        "that environment (`not_warm`, naming the latest status)."
    ),
    503: OpenApiResponse(
        description="No replica answered (`model_unavailable`): the fleet is recovering or "
        "unreachable; see `Retry-After`."
    ),
}


class ModelEmbedApi(TenantScopedMixin, APIView):
    """Embed texts with the tenant's embedding model as its environment's warm deployment
    serves it: the query encoder (``role: query``, the default) or the document encoder.
    Vectors are L2-normalised float32 values; errors as for predict."""

    renderer_classes = [FastJSONRenderer]  # the data plane's answers: see its module

    required_roles = {"POST": Role.VIEWER}

    @extend_schema(
        request=EmbedInputSerializer, responses={200: EmbedOutputSerializer, **_EMBEDDING_ERRORS}
    )
    def post(self, request: Request, tenant: str, name: str) -> Response:
        model = selectors.registered_model(tenant=self.tenant, name=name)
        if model is None:
            raise Http404("No such model.")
        data = EmbedInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(
            fleet.embed(
                tenant=self.tenant,
                model=model,
                inputs=data.validated_data["inputs"],
                role=data.validated_data["role"],
                environment=data.validated_data["environment"],
            )
        )


class ModelSearchApi(TenantScopedMixin, APIView):
    """Search the knowledge base of the tenant's embedding model's warm deployment: the
    ``k`` (1..100) nearest documents to the query by cosine, best first (brute force over
    the deployment's index). Errors as for predict."""

    renderer_classes = [FastJSONRenderer]  # the data plane's answers: see its module

    required_roles = {"POST": Role.VIEWER}

    @extend_schema(
        request=SearchInputSerializer,
        responses={200: SearchOutputSerializer, **_EMBEDDING_ERRORS},
    )
    def post(self, request: Request, tenant: str, name: str) -> Response:
        model = selectors.registered_model(tenant=self.tenant, name=name)
        if model is None:
            raise Http404("No such model.")
        data = SearchInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(
            fleet.search(
                tenant=self.tenant,
                model=model,
                query=data.validated_data["query"],
                k=data.validated_data["k"],
                environment=data.validated_data["environment"],
            )
        )


class ReindexInputSerializer(serializers.Serializer[Any]):
    dataset_version = serializers.CharField(
        help_text="a retrieval dataset version of this tenant: its knowledge base is indexed"
    )


class DeploymentReindexApi(DeploymentScopedMixin, generics.GenericAPIView[Deployment]):
    """Index another knowledge base into a warm embedding deployment, without retraining
    (202). Blue/green: the current index serves every search until the new one is loaded
    on every replica and verified by a warm-up, then the deployment switches to it; a new
    index that fails is dropped and the current one keeps serving. 400
    `unknown_dataset_version` / `not_retrieval`; 409 `not_embedding`, `not_warm`,
    `reindex_in_progress`, `index_shared` (the version is deployed to another environment
    too: the fleet holds it once, with one index)."""

    serializer_class = DeploymentOutputSerializer
    required_roles = {"POST": Role.REVIEWER}

    @extend_schema(
        request=ReindexInputSerializer,
        responses={
            202: DeploymentOutputSerializer,
            400: OpenApiResponse(
                description="Not a retrieval dataset version of this tenant "
                "(`unknown_dataset_version`, `not_retrieval`)."
            ),
            409: OpenApiResponse(
                description="Not an embedding deployment (`not_embedding`), not warm "
                "(`not_warm`), a reindex already in progress (`reindex_in_progress`), or "
                "the version is deployed to another environment too, sharing its one "
                "index (`index_shared`)."
            ),
        },
    )
    def post(self, request: Request, tenant: str, deployment_id: str) -> Response:
        from apps.core.errors import InvalidInput
        from apps.datasets.models import DatasetVersion

        deployment = self.get_deployment()
        data = ReindexInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset_version = (
            DatasetVersion.objects.select_related("dataset")
            .filter(pk=data.validated_data["dataset_version"], dataset__tenant=self.tenant)
            .first()
        )
        if dataset_version is None:
            raise InvalidInput(
                "No such dataset version in this tenant.",
                code="unknown_dataset_version",
                fields={"dataset_version": ["not found"]},
            )
        reindexed = indexing.deployment_reindex(
            actor=request.user,
            deployment=deployment,
            dataset_version=dataset_version,
            via=request_via(request),
        )
        fresh = selectors.deployments_for(self.tenant).get(pk=reindexed.pk)
        return Response(DeploymentOutputSerializer(fresh).data, status=status.HTTP_202_ACCEPTED)


# The fleet's shape (RayFleet.status in worker/serving/fleet.py, as fleet_status_for
# filters it), for the schema only: the view answers the published dict. Backends differ
# (SageMaker's replicas are endpoint instances), so only what fleet_status_for always
# writes is required.
_OPT: dict[str, Any] = {"required": False}
_NULL: dict[str, Any] = {"required": False, "allow_null": True}


class FleetBaseSerializer(serializers.Serializer[Any]):
    base_model = serializers.CharField(help_text="the catalogue entry, e.g. minilm-l6-lora")
    name = serializers.CharField(help_text="the shared weights, e.g. all-MiniLM-L6-v2")
    sha256 = serializers.CharField()
    memory_bytes = serializers.IntegerField(help_text="held once by the replica")
    adapters = serializers.IntegerField(
        help_text="adapters loaded on it, every tenant's (only yours are in `models`)"
    )


# Inline: a model's `errors` count would shadow Serializer.errors on a class.
FleetModelSerializer = inline_serializer(
    "FleetModel",
    {
        "model_id": serializers.CharField(help_text="the model version's id"),
        "format": serializers.ChoiceField(choices=ArtifactFormat.choices),
        "base_sha256": serializers.CharField(help_text="an adapter's base; empty for a full model"),
        "memory_bytes": serializers.IntegerField(
            help_text="its own, without a shared base", **_NULL
        ),
        "sha256": serializers.CharField(**_NULL),
        "pinned": serializers.BooleanField(**_OPT),
        "loaded": serializers.BooleanField(**_OPT),
        "load_ms": serializers.FloatField(**_NULL),
        "hits": serializers.IntegerField(**_OPT),
        "misses": serializers.IntegerField(**_OPT),
        "requests": serializers.IntegerField(**_OPT),
        "errors": serializers.IntegerField(**_OPT),
        "latency_ms_p50": serializers.FloatField(**_NULL),
        "latency_ms_p99": serializers.FloatField(**_NULL),
        "error": serializers.CharField(**_NULL),
        "tenant": serializers.CharField(**_OPT),
        "model": serializers.CharField(**_OPT),
        "version": serializers.IntegerField(**_OPT),
        "deployments": serializers.ListField(child=serializers.DictField(), **_OPT),
    },
)


class FleetReplicaSerializer(serializers.Serializer[Any]):
    replica_id = serializers.CharField()
    bases = FleetBaseSerializer(many=True, help_text="empty where it holds no shared base")
    models = serializers.ListField(child=FleetModelSerializer)
    other_tenants_models = serializers.IntegerField()
    other_tenants_memory_bytes = serializers.IntegerField()
    memory_used_bytes = serializers.IntegerField(
        help_text="every model's own bytes and each shared base once", **_OPT
    )
    started_at = serializers.FloatField(**_OPT)
    device = serializers.CharField(**_OPT)
    version = serializers.CharField(**_OPT)
    rss_bytes = serializers.IntegerField(**_OPT)
    state = serializers.CharField(**_OPT)


class FleetSetSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(**_OPT)
    index = serializers.IntegerField(help_text="-1 for the long tail", **_OPT)
    budget_bytes = serializers.IntegerField(**_OPT)
    models = serializers.ListField(child=serializers.CharField(), **_OPT)
    other_tenants_models = serializers.IntegerField(**_OPT)
    replicas = FleetReplicaSerializer(many=True)


class FleetPoolSerializer(serializers.Serializer[Any]):
    kind = serializers.CharField()
    capacity = serializers.DictField(**_OPT)
    sets = FleetSetSerializer(many=True)
    tail = FleetSetSerializer(**_NULL)


class FleetApi(APIView):
    """The serving fleet as the fleet controller last published it (``published_at``,
    ``age_seconds``, ``controller``: whether one holds the lease): pools, replica sets,
    replicas, the shared bases each holds (once, whoever's adapters use them) and the
    models on each with their format, memory, load time, cache hits/misses, request counts
    and latency percentiles. Other tenants' models are counted, not named."""

    @extend_schema(
        responses=inline_serializer(
            "Fleet",
            {
                "pools": FleetPoolSerializer(many=True),
                "published_at": serializers.DateTimeField(allow_null=True),
                "age_seconds": serializers.FloatField(allow_null=True),
                "controller": serializers.DictField(),
            },
        )
    )
    def get(self, request: Request) -> Response:
        return Response(fleet.fleet_status_for(request.user))
