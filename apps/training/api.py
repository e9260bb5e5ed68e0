from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.core.api import Pagination
from apps.datasets.models import DatasetVersion, Task
from apps.datasets.selectors import versions_for_tenant
from apps.registry.models import ArtifactFormat
from apps.tenants.auth import request_via
from apps.tenants.scoping import TenantScopedMixin
from apps.training import selectors, services
from apps.training.filters import RunFilter
from apps.training.models import RunMetric, Sweep, TrainingRun
from apps.training.params import params_resolve, unknown_params
from apps.training.tracking import mlflow_run_url


def _catalogue_ids() -> list[str]:
    from worker.base_models import catalogue

    return [m.id for m in catalogue()]


class BaseModelSerializer(serializers.Serializer[Any]):
    id = serializers.CharField()
    name = serializers.CharField()
    kind = serializers.CharField()
    format = serializers.ChoiceField(
        choices=ArtifactFormat.choices,
        help_text="full: a version holds the whole model; adapter: only the tenant's adapter "
        "and head, on shared base weights every replica holds once",
    )
    base = serializers.CharField(
        allow_null=True, help_text="the shared weights an adapter adapts; null for full models"
    )
    base_sha256 = serializers.CharField(
        allow_null=True,
        help_text="sha256 of the shared weights; null for full models and when not installed",
    )
    installed = serializers.BooleanField(help_text="whether this host has its weights")
    default = serializers.BooleanField(help_text="what a run that names no base model trains")
    defaults = serializers.DictField(
        help_text="the parameters a run of this base gets for those it does not name"
    )
    size_bytes = serializers.IntegerField()
    description = serializers.CharField()


class BaseModelListApi(APIView):
    """The catalogue of base models: the same for every tenant, not tenant data."""

    @extend_schema(responses=BaseModelSerializer(many=True))
    def get(self, request: Request) -> Response:
        from worker import base_models

        default = base_models.default_base_model()
        rows = []
        for m in base_models.catalogue():
            installed = base_models.installed(m.id)
            rows.append(
                {
                    "id": m.id,
                    "name": m.name,
                    "kind": m.kind,
                    "format": m.format,
                    "base": m.base,
                    "base_sha256": base_models.base_sha256(m.id) if installed else None,
                    "installed": installed,
                    "default": m.id == default,
                    "defaults": m.defaults(),
                    "size_bytes": base_models.size_bytes(m.id) if installed else 0,
                    "description": m.description,
                }
            )
        return Response(BaseModelSerializer(rows, many=True).data)


class TenantVersionField(serializers.CharField):
    """A dataset version id, looked up inside the request's tenant only."""

    def to_internal_value(self, data: Any) -> DatasetVersion:  # type: ignore[override]
        value = super().to_internal_value(data)
        # Its validators (a NUL character, which PostgreSQL refuses in any query) before the
        # lookup, not after it.
        self.run_validators(value)
        found = versions_for_tenant(tenant=self.context["tenant"]).filter(pk=value).first()
        if found is None:  # unknown and other tenants' ids read the same
            raise serializers.ValidationError("No such dataset version.")
        return found


def _base_model_for(attrs: dict[str, Any]) -> str:
    """The base model named, or for none the catalogue's default for the data's task: an
    embedding model for retrieval pairs, the tiny GPT-2 for a reply corpus, a classifier
    otherwise."""
    from worker import base_models

    if attrs.get("base_model"):
        return str(attrs["base_model"])
    if attrs["dataset_version"].dataset.task == Task.RETRIEVAL:
        return base_models.MINILM_L6_EMBED
    if attrs["dataset_version"].dataset.task == Task.TEXT_GENERATION:
        return base_models.TINY_GPT2
    return base_models.default_base_model()


class RunInputSerializer(serializers.Serializer[Any]):
    dataset_version = TenantVersionField()
    validation_version = TenantVersionField(required=False, allow_null=True, default=None)
    base_model = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="A catalogue id (GET /api/v1/base-models/); empty: the catalogue's default "
        "for the data's task, the LoRA adapter base where its weights are installed (the "
        "embedding base, minilm-l6-embed, for retrieval data; tiny-gpt2 for a reply corpus).",
    )
    model_name = serializers.RegexField(
        r"^[a-z0-9][a-z0-9._-]{0,99}$", required=False, allow_blank=True, default=""
    )
    params = serializers.DictField(
        required=False,
        default=dict,
        help_text="TrainConfig's fields; those not named get the base model's defaults "
        "(its 'defaults' in the catalogue), then TrainConfig's. LoRA parameters (lora_r, "
        "lora_alpha, lora_dropout, lora_target_modules) are for adapter bases only; "
        "separate_encoders and document_fields for embedding bases only; init_from "
        "(scratch or pretrained) for autocomplete bases only.",
    )

    def validate_base_model(self, value: str) -> str:
        known = _catalogue_ids()
        if value and value not in known:
            raise serializers.ValidationError(
                f"Unknown base model '{value}'; choose one of: {', '.join(known)}."
            )
        return value

    def validate_params(self, value: dict[str, Any]) -> dict[str, Any]:
        message = unknown_params(value)
        if message:
            raise serializers.ValidationError(message)
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs["base_model"] = _base_model_for(attrs)
        attrs["params"] = resolved_params(attrs["base_model"], attrs["params"])
        return attrs


def resolved_params(base_model: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` resolved against the base model's defaults; a 400 under ``params``, by
    parameter name, for what TrainConfig refuses."""
    resolved, problems = params_resolve(base_model=base_model, given=given)
    if problems:
        raise serializers.ValidationError(
            {"params": {name or "non_field_errors": [m] for name, m in problems.items()}}
        )
    return resolved


class RunOutputSerializer(serializers.ModelSerializer[TrainingRun]):
    dataset = serializers.CharField(source="dataset_version.dataset_id", read_only=True)
    dataset_version = serializers.CharField(source="dataset_version_id", read_only=True)
    validation_version = serializers.CharField(
        source="validation_version_id", read_only=True, allow_null=True
    )
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)  # type: ignore[var-annotated]
    queue_position = serializers.SerializerMethodField()
    model_version = serializers.SerializerMethodField()
    mlflow_url = serializers.SerializerMethodField()

    class Meta:
        model = TrainingRun
        fields = [
            "id",
            "status",
            "queue_position",
            "progress",
            "metrics",
            "base_model",
            "params",
            "dataset",
            "dataset_version",
            "validation_version",
            "model_name",
            "stop_reason",
            "stop_detail",
            "error",
            "attempt",
            "checkpoint_step",
            "cancel_requested",
            "mlflow_run_id",
            "mlflow_url",
            "model_version",
            "environment",
            "sweep",
            "rerun_of",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]

    def get_queue_position(self, run: TrainingRun) -> int | None:
        positions: dict[str, int] = self.context.get("queue_positions", {})
        return positions.get(run.pk)

    def get_model_version(self, run: TrainingRun) -> dict[str, Any] | None:
        version = getattr(run, "model_version", None)
        if version is None:
            return None
        return {
            "id": version.pk,
            "model": version.registered_model.name,
            "number": version.number,
            "sha256": version.sha256,
            "format": version.format,
        }

    def get_mlflow_url(self, run: TrainingRun) -> str:
        return mlflow_run_url(run.mlflow_run_id)


class RunDetailOutputSerializer(RunOutputSerializer):
    class Meta(RunOutputSerializer.Meta):
        fields = [*RunOutputSerializer.Meta.fields, "log_tail"]


class RunScopedMixin(TenantScopedMixin):
    kwargs: dict[str, Any]

    def get_run(self) -> TrainingRun:
        run = selectors.runs_for_tenant(tenant=self.tenant).filter(pk=self.kwargs["run_id"]).first()
        if run is None:
            raise Http404("No such run.")
        return run

    def run_context(self) -> dict[str, Any]:
        return {"queue_positions": selectors.queue_positions(tenant=self.tenant)}


class RunListCreateApi(RunScopedMixin, generics.ListAPIView[TrainingRun]):
    serializer_class = RunOutputSerializer
    filterset_class = RunFilter

    def get_queryset(self) -> Any:
        return selectors.runs_for_tenant(tenant=self.tenant)

    def get_serializer_context(self) -> dict[str, Any]:
        context = dict(super().get_serializer_context())
        if not getattr(self, "swagger_fake_view", False):
            context.update(self.run_context())
        return context

    @extend_schema(request=RunInputSerializer, responses={202: RunOutputSerializer})
    def post(self, request: Request, tenant: str) -> Response:
        data = RunInputSerializer(data=request.data, context={"tenant": self.tenant})
        data.is_valid(raise_exception=True)
        run = services.run_launch(
            actor=request.user, tenant=self.tenant, via=request_via(request), **data.validated_data
        )
        run = self.get_queryset().get(pk=run.pk)
        return Response(
            RunOutputSerializer(run, context=self.run_context()).data,
            status=status.HTTP_202_ACCEPTED,
        )


class RunDetailApi(RunScopedMixin, generics.GenericAPIView[TrainingRun]):
    serializer_class = RunDetailOutputSerializer

    def get(self, request: Request, tenant: str, run_id: str) -> Response:
        return Response(RunDetailOutputSerializer(self.get_run(), context=self.run_context()).data)


class RunCancelApi(RunScopedMixin, generics.GenericAPIView[TrainingRun]):
    serializer_class = RunOutputSerializer

    @extend_schema(request=None, responses=RunOutputSerializer)
    def post(self, request: Request, tenant: str, run_id: str) -> Response:
        run = services.run_cancel(actor=request.user, run=self.get_run(), via=request_via(request))
        run = self.get_run()
        return Response(RunOutputSerializer(run, context=self.run_context()).data)


class RunRerunApi(RunScopedMixin, generics.GenericAPIView[TrainingRun]):
    serializer_class = RunOutputSerializer

    @extend_schema(request=None, responses={202: RunOutputSerializer})
    def post(self, request: Request, tenant: str, run_id: str) -> Response:
        run = services.run_rerun(actor=request.user, run=self.get_run(), via=request_via(request))
        run = selectors.runs_for_tenant(tenant=self.tenant).get(pk=run.pk)
        return Response(
            RunOutputSerializer(run, context=self.run_context()).data,
            status=status.HTTP_202_ACCEPTED,
        )


class RunMetricSerializer(serializers.ModelSerializer[RunMetric]):
    class Meta:
        model = RunMetric
        fields = ["name", "step", "epoch", "value"]


class RunMetricsPagination(Pagination):
    page_size = 1000
    max_page_size = 10000


class RunMetricsApi(RunScopedMixin, generics.ListAPIView[RunMetric]):
    serializer_class = RunMetricSerializer
    pagination_class = RunMetricsPagination

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return RunMetric.objects.none()
        return selectors.metric_points(
            run=self.get_run(), name=self.request.query_params.get("name")
        )


CLASSIFIER_SWEEP_METRICS = ("val_macro_f1", "val_accuracy", "val_loss")
EMBEDDING_SWEEP_METRICS = (
    "val_mrr_at_10",
    "val_recall_at_1",
    "val_recall_at_5",
    "val_recall_at_10",
    "val_ndcg_at_10",
)


# An autocomplete run's: goal max suits next-word accuracy; name goal min for val_loss.
AUTOCOMPLETE_SWEEP_METRICS = ("val_next_word_top1", "val_loss", "val_perplexity")


def _sweep_metrics(base_model: str) -> tuple[str, ...]:
    """What a run of ``base_model`` reports per epoch (a sweep ranks its runs by one)."""
    from worker import base_models

    kind = base_models.get(base_model).kind
    if kind == base_models.KIND_EMBEDDING:
        return EMBEDDING_SWEEP_METRICS
    if kind == base_models.KIND_AUTOCOMPLETE:
        return AUTOCOMPLETE_SWEEP_METRICS
    return CLASSIFIER_SWEEP_METRICS


class SweepInputSerializer(serializers.Serializer[Any]):
    dataset_version = TenantVersionField()
    validation_version = TenantVersionField(required=False, allow_null=True, default=None)
    base_model = serializers.CharField(required=False, allow_blank=True, default="")
    model_name = serializers.RegexField(
        r"^[a-z0-9][a-z0-9._-]{0,99}$", required=False, allow_blank=True, default=""
    )
    params = serializers.DictField(required=False, default=dict)
    grid = serializers.DictField(child=serializers.ListField(min_length=1, max_length=20))
    metric = serializers.ChoiceField(
        choices=list(
            dict.fromkeys(
                [*CLASSIFIER_SWEEP_METRICS, *EMBEDDING_SWEEP_METRICS, *AUTOCOMPLETE_SWEEP_METRICS]
            )
        ),
        required=False,
        help_text="default: val_macro_f1 for a classifier, val_mrr_at_10 for an embedding "
        "model, val_next_word_top1 for an autocomplete model",
    )
    goal = serializers.ChoiceField(choices=["max", "min"], default="max")

    validate_base_model = RunInputSerializer.validate_base_model
    validate_params = RunInputSerializer.validate_params

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        grid = attrs["grid"]
        if not grid:
            raise serializers.ValidationError({"grid": ["Name at least one parameter to vary."]})
        base_model = attrs["base_model"] = _base_model_for(attrs)
        metrics = _sweep_metrics(base_model)
        attrs.setdefault("metric", metrics[0])
        if attrs["metric"] not in metrics:
            raise serializers.ValidationError(
                {"metric": [f"'{base_model}' runs report {', '.join(metrics)}."]}
            )
        for point in services.grid_points(grid):
            message = unknown_params(point)
            _, problems = params_resolve(base_model=base_model, given={**attrs["params"], **point})
            if message or problems:
                detail = message or "; ".join(f"{k}: {v}" if k else v for k, v in problems.items())
                raise serializers.ValidationError({"grid": [f"{point}: {detail}"]})
        attrs["params"] = resolved_params(base_model, attrs["params"])
        return attrs


class SweepOutputSerializer(serializers.ModelSerializer[Sweep]):
    runs = serializers.SerializerMethodField()
    best_run = serializers.SerializerMethodField()

    class Meta:
        model = Sweep
        fields = [
            "id",
            "dataset_version",
            "base_model",
            "grid",
            "base_params",
            "metric",
            "goal",
            "runs",
            "best_run",
            "created_at",
        ]

    def get_runs(self, sweep: Sweep) -> list[dict[str, Any]]:
        return [
            {
                "id": r.pk,
                "status": r.status,
                "params": r.params,
                "metric": r.metrics.get(sweep.metric),
            }
            for r in sweep.runs.order_by("created_at")
        ]

    def get_best_run(self, sweep: Sweep) -> str | None:
        best = selectors.sweep_best_run(sweep=sweep)
        return best.pk if best else None


class SweepListCreateApi(TenantScopedMixin, generics.ListAPIView[Sweep]):
    serializer_class = SweepOutputSerializer

    def get_queryset(self) -> Any:
        return selectors.sweeps_for_tenant(tenant=self.tenant).order_by("-created_at")

    @extend_schema(request=SweepInputSerializer, responses={202: SweepOutputSerializer})
    def post(self, request: Request, tenant: str) -> Response:
        data = SweepInputSerializer(data=request.data, context={"tenant": self.tenant})
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        sweep = services.sweep_launch(
            actor=request.user,
            tenant=self.tenant,
            base_params=values.pop("params"),
            via=request_via(request),
            **values,
        )
        return Response(SweepOutputSerializer(sweep).data, status=status.HTTP_202_ACCEPTED)


class SweepDetailApi(TenantScopedMixin, generics.GenericAPIView[Sweep]):
    serializer_class = SweepOutputSerializer

    def get(self, request: Request, tenant: str, sweep_id: str) -> Response:
        sweep = selectors.sweeps_for_tenant(tenant=self.tenant).filter(pk=sweep_id).first()
        if sweep is None:
            raise Http404("No such sweep.")
        return Response(SweepOutputSerializer(sweep).data)
