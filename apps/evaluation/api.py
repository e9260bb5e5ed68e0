from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import extend_schema, extend_schema_field, inline_serializer
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.datasets.selectors import versions_for_tenant
from apps.evaluation import services
from apps.evaluation.models import Evaluation, PromotionPolicy
from apps.registry.models import ModelKind, ModelVersion
from apps.tenants.auth import request_via
from apps.tenants.models import Role
from apps.tenants.scoping import TenantScopedMixin


class RetrievalMetricsSerializer(serializers.Serializer[Any]):
    """An embedding model's ranking quality on one retrieval set (worker.retrieval's
    definitions: recall@k the share of queries with a relevant document in the first k)."""

    recall_at_1 = serializers.FloatField()
    recall_at_5 = serializers.FloatField()
    recall_at_10 = serializers.FloatField()
    mrr_at_10 = serializers.FloatField()
    ndcg_at_10 = serializers.FloatField()


class BaseRetrievalMetricsSerializer(RetrievalMetricsSerializer):
    base_model = serializers.CharField(help_text="the catalogue's base model the version tunes")
    base_sha256 = serializers.CharField(help_text="the base weights measured")
    max_length = serializers.IntegerField(help_text="the version's, so both read the same text")
    reused_from = serializers.CharField(
        allow_null=True,
        help_text="the evaluation whose measurement of this base on this set was reused",
    )


class RetrievalResultSerializer(serializers.Serializer[Any]):
    """What an embedding evaluation measured; null for a classifier's."""

    metrics = RetrievalMetricsSerializer()
    base = BaseRetrievalMetricsSerializer(
        allow_null=True, help_text="the un-tuned base on the same set, measured the same way"
    )
    curve = serializers.ListField(
        child=serializers.FloatField(), help_text="recall@k for k = 1..20"
    )
    base_curve = serializers.ListField(child=serializers.FloatField())
    queries = serializers.IntegerField(help_text="distinct queries")
    documents = serializers.IntegerField()
    wrong_queries = serializers.IntegerField(
        help_text="queries whose first result is not a relevant document"
    )


def _retrieval(evaluation: Evaluation) -> dict[str, Any] | None:
    metrics = evaluation.metrics if isinstance(evaluation.metrics, dict) else {}
    if metrics.get("task") != "retrieval":
        return None
    base = evaluation.base_metrics if isinstance(evaluation.base_metrics, dict) else {}
    keys = services.RETRIEVAL_METRICS
    return {
        "metrics": {k: metrics.get(k) for k in keys},
        "base": {
            **{k: base.get(k) for k in keys},
            **{k: base.get(k) for k in ("base_model", "base_sha256", "max_length")},
            "reused_from": base.get("reused_from"),
        }
        if base
        else None,
        "curve": metrics.get("recall_curve") or [],
        "base_curve": base.get("recall_curve") or [],
        "queries": metrics.get("queries", 0),
        "documents": metrics.get("documents", 0),
        "wrong_queries": metrics.get("wrong_queries", 0),
    }


class AutocompleteMetricsSerializer(serializers.Serializer[Any]):
    """An autocomplete model's figures on one reply corpus (worker.autocomplete_eval's
    definitions)."""

    perplexity = serializers.FloatField(
        allow_null=True, help_text="per reply token; null for the trigram (it has none)"
    )
    next_word_top1 = serializers.FloatField(
        help_text="share of word boundaries whose greedy completion starts with the next word"
    )
    next_word_top3 = serializers.FloatField()
    exact_match = serializers.FloatField(
        help_text="share of held-out half-replies completed exactly to their sentence end"
    )
    keystrokes_saved = serializers.FloatField(
        help_text="1 - keystrokes / characters, accepting whole right suggestions (one key)"
    )
    latency_ms_per_token_p50 = serializers.FloatField()
    latency_ms_per_token_p95 = serializers.FloatField()
    replies = serializers.IntegerField(help_text="replies measured")
    positions = serializers.IntegerField(help_text="word boundaries measured")


class AutocompleteSampleSerializer(serializers.Serializer[Any]):
    """A held-out prefix of a reply, the version's greedy completion and the reply's rest."""

    prefix = serializers.CharField()
    # Declared fields leave the class (DRF's metaclass), so Serializer.context stays intact.
    context = serializers.CharField(allow_blank=True)  # type: ignore[assignment]
    completion = serializers.CharField(allow_blank=True)
    reference = serializers.CharField(allow_blank=True, help_text="up to its sentence end")
    matched = serializers.BooleanField()
    max_tokens = serializers.IntegerField()


class AutocompleteResultSerializer(serializers.Serializer[Any]):
    """What an autocomplete evaluation measured; null for another kind's."""

    metrics = AutocompleteMetricsSerializer()
    base = AutocompleteMetricsSerializer(
        allow_null=True,
        help_text="the tenant's word trigram fitted on the version's training replies, "
        "measured the same way on the same set",
    )
    base_trained_on = serializers.CharField(
        allow_null=True, help_text="the dataset version the trigram was fitted on"
    )
    samples = AutocompleteSampleSerializer(
        many=True, help_text="held-out prefixes (none kept of a shared golden set)"
    )


def _autocomplete(evaluation: Evaluation) -> dict[str, Any] | None:
    metrics = evaluation.metrics if isinstance(evaluation.metrics, dict) else {}
    if metrics.get("task") != "text-generation":
        return None
    base = evaluation.base_metrics if isinstance(evaluation.base_metrics, dict) else {}
    keys = (*services.AUTOCOMPLETE_METRICS, *services.AUTOCOMPLETE_LATENCY, "replies",
            "positions")  # fmt: skip
    samples = evaluation.samples if isinstance(evaluation.samples, list) else []
    return {
        "metrics": {k: metrics.get(k) for k in keys},
        "base": {k: base.get(k) for k in keys} if base else None,
        "base_trained_on": base.get("trained_on"),
        "samples": [s for s in samples if isinstance(s, dict)],
    }


class EvaluationOutputSerializer(serializers.ModelSerializer[Evaluation]):
    model_version = serializers.CharField(source="model_version_id", read_only=True)
    dataset_version = serializers.CharField(source="dataset_version_id", read_only=True)
    dataset = serializers.CharField(source="dataset_version.dataset.name", read_only=True)
    dataset_kind = serializers.CharField(source="dataset_version.dataset.kind", read_only=True)
    retrieval = serializers.SerializerMethodField()
    autocomplete = serializers.SerializerMethodField()

    @extend_schema_field(RetrievalResultSerializer(allow_null=True))
    def get_retrieval(self, evaluation: Evaluation) -> dict[str, Any] | None:
        return _retrieval(evaluation)

    @extend_schema_field(AutocompleteResultSerializer(allow_null=True))
    def get_autocomplete(self, evaluation: Evaluation) -> dict[str, Any] | None:
        return _autocomplete(evaluation)

    class Meta:
        model = Evaluation
        fields = [
            "id",
            "model_version",
            "dataset_version",
            "dataset",
            "dataset_kind",
            "status",
            "artifact_sha256",
            "max_rows",
            "metrics",
            "retrieval",
            "autocomplete",
            "error",
            "created_at",
            "finished_at",
        ]


class EvaluationInputSerializer(serializers.Serializer[Any]):
    model_version = serializers.CharField()
    dataset_versions = serializers.ListField(
        child=serializers.CharField(), required=False, default=list, max_length=50
    )

    def validate_model_version(self, value: str) -> ModelVersion:
        found = ModelVersion.objects.filter(
            pk=value, registered_model__tenant=self.context["tenant"]
        ).first()
        if found is None:
            raise serializers.ValidationError("No such model version.")
        return found

    def validate_dataset_versions(self, value: list[str]) -> list[Any]:
        versions = {
            v.pk: v for v in versions_for_tenant(tenant=self.context["tenant"]).filter(pk__in=value)
        }
        missing = [v for v in value if v not in versions]
        if missing:
            raise serializers.ValidationError(f"No such dataset version: {', '.join(missing)}.")
        return [versions[v] for v in value]


def _evaluations(tenant: Any) -> Any:
    return Evaluation.objects.filter(tenant=tenant).select_related("dataset_version__dataset")


class EvaluationListCreateApi(TenantScopedMixin, generics.ListAPIView[Evaluation]):
    serializer_class = EvaluationOutputSerializer
    filterset_fields = ["status", "model_version", "dataset_version"]

    def get_queryset(self) -> Any:
        return _evaluations(self.tenant)

    @extend_schema(
        request=EvaluationInputSerializer,
        responses={
            202: inline_serializer(
                "EvaluationsRequested", {"evaluations": EvaluationOutputSerializer(many=True)}
            )
        },
    )
    def post(self, request: Request, tenant: str) -> Response:
        data = EvaluationInputSerializer(data=request.data, context={"tenant": self.tenant})
        data.is_valid(raise_exception=True)
        created = services.evaluation_request(
            actor=request.user,
            tenant=self.tenant,
            model_version=data.validated_data["model_version"],
            dataset_versions=data.validated_data["dataset_versions"] or None,
            via=request_via(request),
        )
        rows = _evaluations(self.tenant).filter(pk__in=[e.pk for e in created])
        return Response(
            {"evaluations": EvaluationOutputSerializer(rows, many=True).data},
            status=status.HTTP_202_ACCEPTED,
        )


class EvaluationDetailApi(TenantScopedMixin, generics.GenericAPIView[Evaluation]):
    serializer_class = EvaluationOutputSerializer

    def get(self, request: Request, tenant: str, evaluation_id: str) -> Response:
        found = _evaluations(self.tenant).filter(pk=evaluation_id).first()
        if found is None:
            raise Http404("No such evaluation.")
        return Response(EvaluationOutputSerializer(found).data)


class RankedDocumentSerializer(serializers.Serializer[Any]):
    document_id = serializers.CharField()
    title = serializers.CharField(allow_blank=True)
    score = serializers.FloatField()


class WrongQuerySerializer(serializers.Serializer[Any]):
    """A golden query whose first result is not a relevant document."""

    query = serializers.CharField()
    document_id = serializers.CharField(help_text="the expected document")
    title = serializers.CharField(allow_blank=True, help_text="the expected document's title")
    relevant = serializers.ListField(child=serializers.CharField())
    first_hit = serializers.IntegerField(
        allow_null=True, help_text="rank of the first relevant document; null: not in the top 10"
    )
    ranked = RankedDocumentSerializer(many=True, help_text="what the version ranked first")


class EvaluationWrongQueriesApi(TenantScopedMixin, generics.GenericAPIView[Evaluation]):
    """The queries an embedding version ranks wrong on a golden retrieval set of the
    tenant's own (a shared domain set keeps none), worst first as measured, paginated;
    at most the first 200 are kept. A classifier's evaluation has none (an empty page)."""

    serializer_class = WrongQuerySerializer
    queryset = Evaluation.objects.none()  # the schema's; get() reads the tenant's own

    @extend_schema(responses=WrongQuerySerializer(many=True))
    def get(self, request: Request, tenant: str, evaluation_id: str) -> Response:
        found = _evaluations(self.tenant).filter(pk=evaluation_id).first()
        if found is None:
            raise Http404("No such evaluation.")
        rows = found.wrong_queries if isinstance(found.wrong_queries, list) else []
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(WrongQuerySerializer(page, many=True).data)


class GateSerializer(serializers.Serializer[Any]):
    metric = serializers.ChoiceField(choices=services.GATE_METRICS)
    op = serializers.ChoiceField(choices=services.GATE_OPS)
    value = serializers.FloatField()
    dataset = serializers.CharField(
        required=False,
        allow_null=True,
        default=None,
        help_text="a dataset id; empty: every evaluated dataset",
    )


class PolicySerializer(serializers.Serializer[Any]):
    model_kind = serializers.CharField(read_only=True)
    gates = GateSerializer(many=True)
    max_regression_vs_champion = serializers.FloatField(
        required=False, allow_null=True, default=None, min_value=0
    )
    latency_budget_ms = serializers.FloatField(
        required=False, allow_null=True, default=None, min_value=0
    )
    require_staging_before_production = serializers.BooleanField(required=False, default=False)
    trainer_may_approve = serializers.BooleanField(
        required=False,
        default=False,
        help_text="whether the user who launched a version's training run may approve its "
        "promotion; default (and when left out of a PUT): no",
    )
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)

    def validate_gates(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tenant = self.context["tenant"]
        kind = self.context.get("model_kind")
        if kind:
            allowed = services.gate_metrics(kind)
            for gate in value:
                if gate["metric"] not in allowed:
                    raise serializers.ValidationError(
                        f"{services.article(kind).title()} {kind} model is not measured on "
                        f"{gate['metric']}; one of {', '.join(allowed)}."
                    )
        for gate in value:
            dataset = gate.get("dataset")
            if (
                dataset
                and not versions_for_tenant(tenant=tenant).filter(dataset_id=dataset).exists()
            ):
                raise serializers.ValidationError(f"No such dataset: {dataset}.")
        return [dict(g) for g in value]


def _policy_data(policy: PromotionPolicy) -> dict[str, Any]:
    return {
        "model_kind": policy.model_kind,
        "gates": policy.gates,
        "max_regression_vs_champion": policy.max_regression_vs_champion,
        "latency_budget_ms": policy.latency_budget_ms,
        "require_staging_before_production": policy.require_staging_before_production,
        "trainer_may_approve": policy.trainer_may_approve,
        "updated_at": policy.updated_at,
    }


class PolicyListApi(TenantScopedMixin, generics.GenericAPIView[PromotionPolicy]):
    serializer_class = PolicySerializer
    pagination_class = None
    queryset = PromotionPolicy.objects.none()  # for the schema; rows come from policy_for

    @extend_schema(responses=PolicySerializer(many=True))
    def get(self, request: Request, tenant: str) -> Response:
        rows = [
            _policy_data(services.policy_for(tenant=self.tenant, model_kind=kind))
            for kind in ModelKind.values
        ]
        return Response(PolicySerializer(rows, many=True).data)


class PolicyDetailApi(TenantScopedMixin, generics.GenericAPIView[PromotionPolicy]):
    serializer_class = PolicySerializer
    queryset = PromotionPolicy.objects.none()  # for the schema; rows come from policy_for
    required_roles = {"PUT": Role.ADMIN}
    kwargs: dict[str, Any]

    def _kind(self) -> str:
        if self.kwargs["model_kind"] not in ModelKind.values:
            raise Http404("No such model kind.")
        return str(self.kwargs["model_kind"])

    def get(self, request: Request, tenant: str, model_kind: str) -> Response:
        policy = services.policy_for(tenant=self.tenant, model_kind=self._kind())
        return Response(PolicySerializer(_policy_data(policy)).data)

    def put(self, request: Request, tenant: str, model_kind: str) -> Response:
        kind = self._kind()
        data = PolicySerializer(
            data=request.data, context={"tenant": self.tenant, "model_kind": kind}
        )
        data.is_valid(raise_exception=True)
        policy = services.policy_update(
            actor=request.user,
            tenant=self.tenant,
            model_kind=kind,
            via=request_via(request),
            **data.validated_data,
        )
        return Response(PolicySerializer(_policy_data(policy)).data)
