"""Campaigns over REST (staff): create, list, progress, items, cancel, batch decisions."""

from __future__ import annotations

from typing import Any

import django_filters
from django.http import Http404
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.campaigns import services
from apps.campaigns.models import (
    Campaign,
    CampaignItem,
    CampaignStatus,
    ItemState,
    SkipReason,
    Trigger,
)
from apps.core.api import Pagination, default_permissions_and
from apps.promotions.gates import champion_delta
from apps.promotions.models import PromotionRequest, PromotionStatus, Target
from apps.tenants.api import OrgOperator, OrgOperatorOrReviewer
from apps.tenants.auth import request_via
from apps.tenants.models import Tenant

MAX_LISTED_TENANTS = 10_000
MAX_LISTED_PROMOTIONS = 10_000


def _plain_strings(values: list[Any]) -> bool:
    """Every value a non-empty string without a NUL (PostgreSQL refuses one in a query)."""
    return all(isinstance(v, str) and v and "\x00" not in v for v in values)


MODEL_NAME = r"^[a-z0-9][a-z0-9._-]{0,99}\Z"


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "enum": ["all"]},
            {
                "type": "array",
                "items": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
                "minItems": 1,
                "maxItems": MAX_LISTED_TENANTS,
            },
        ],
        "description": '"all", or the slugs of the tenants to retrain in.',
    }
)
class TenantSelectionField(serializers.Field):  # type: ignore[type-arg]
    def to_internal_value(self, data: Any) -> str | list[str]:
        if data == "all":
            return "all"
        if not isinstance(data, list) or not data or len(data) > MAX_LISTED_TENANTS:
            raise serializers.ValidationError(
                f'Give "all" or a list of 1 to {MAX_LISTED_TENANTS} tenant slugs.'
            )
        if not _plain_strings(data):
            raise serializers.ValidationError("Each tenant is named by its slug (a string).")
        slugs = list(dict.fromkeys(data))
        known = set(Tenant.objects.filter(slug__in=slugs).values_list("slug", flat=True))
        unknown = [s for s in slugs if s not in known]
        if unknown:
            raise serializers.ValidationError(
                f"No such tenant(s): {', '.join(unknown[:20])}"
                + (" ..." if len(unknown) > 20 else "")
            )
        return slugs

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "enum": ["last"]},
            {
                "type": "object",
                "properties": {
                    "base_model": {"type": "string"},
                    "params": {"type": "object", "additionalProperties": True},
                },
                "required": ["base_model"],
            },
        ],
        "description": '"last": each tenant\'s last successful configuration of this model '
        "(its base model and params); or a base model (GET /api/v1/base-models/) with "
        "params, resolved against its defaults as a run's are.",
    }
)
class RecipeField(serializers.Field):  # type: ignore[type-arg]
    def to_internal_value(self, data: Any) -> dict[str, Any]:
        from apps.training.api import _catalogue_ids, resolved_params
        from apps.training.params import unknown_params

        if data == "last":
            return {"last": True}
        if not isinstance(data, dict) or not isinstance(data.get("base_model"), str):
            raise serializers.ValidationError('"last", or {"base_model": ..., "params": {...}}.')
        extra = sorted(set(data) - {"base_model", "params"})
        if extra:
            raise serializers.ValidationError(f"Unknown key(s): {', '.join(extra)}.")
        base_model, params = data["base_model"], data.get("params", {})
        known = _catalogue_ids()
        if base_model not in known:
            raise serializers.ValidationError(
                f"Unknown base model '{base_model}'; choose one of: {', '.join(known)}."
            )
        if not isinstance(params, dict):
            raise serializers.ValidationError("params is an object of training parameters.")
        if message := unknown_params(params):
            raise serializers.ValidationError(message)
        try:
            resolved = resolved_params(base_model, params)
        except serializers.ValidationError as error:
            raise serializers.ValidationError(error.detail) from error
        return {"base_model": base_model, "params": resolved}

    def to_representation(self, value: Any) -> Any:
        return "last" if value.get("last") else value


class CampaignInputSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)
    model_name = serializers.RegexField(
        MODEL_NAME, help_text="The model retrained in every selected tenant."
    )
    dataset = serializers.RegexField(
        r"^[^\x00]{1,100}\Z",
        required=False,
        allow_blank=True,
        default="",
        help_text="The name of each tenant's training dataset to train on (its latest "
        "version); blank: the model's name.",
    )
    tenants = TenantSelectionField(required=False)
    domain = serializers.RegexField(
        r"^[a-z0-9-]{1,50}\Z", required=False, help_text="Every tenant of this domain vertical."
    )
    recipe = RecipeField()
    target = serializers.ChoiceField(choices=Target.choices, default=Target.STAGING)
    trigger = serializers.ChoiceField(choices=Trigger.choices, default=Trigger.NOW)
    interval_seconds = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        min_value=60,
        max_value=366 * 86_400,
        help_text="For trigger 'schedule': seconds between rounds (the first is now).",
    )
    weight = serializers.IntegerField(
        default=1,
        min_value=1,
        max_value=100,
        help_text="The campaign's share of the training budget against other campaigns "
        "(each tenant's own runs weigh 1).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        has_tenants, has_domain = "tenants" in attrs, "domain" in attrs
        if has_tenants == has_domain:
            message = 'Name the tenants ("all" or a list of slugs) or a domain, not both.'
            raise serializers.ValidationError({"tenants": [message], "domain": [message]})
        if attrs["trigger"] == Trigger.SCHEDULE and not attrs.get("interval_seconds"):
            raise serializers.ValidationError(
                {"interval_seconds": ["A schedule needs interval_seconds (at least 60)."]}
            )
        if attrs["trigger"] != Trigger.SCHEDULE and attrs.get("interval_seconds"):
            raise serializers.ValidationError(
                {"interval_seconds": ["Only a 'schedule' trigger takes interval_seconds."]}
            )
        selection = {"domain": attrs.pop("domain")} if has_domain else {}
        if has_tenants:
            selection = {"tenants": attrs.pop("tenants")}
        attrs["selection"] = selection
        attrs["dataset_name"] = attrs.pop("dataset")
        return attrs


class ProgressSerializer(serializers.Serializer[Any]):
    total = serializers.IntegerField(help_text="items: one per tenant and trigger firing")
    counts = serializers.DictField(
        child=serializers.IntegerField(),
        help_text="items by status: pending, training, checking, skipped, cancelled, then "
        "their promotion's (awaiting_approval, approved, deploying, done, rejected, failed)",
    )
    skipped = serializers.DictField(child=serializers.IntegerField(), help_text="by reason")
    runs = serializers.DictField(child=serializers.IntegerField(), help_text="by run status")
    gpu_seconds = serializers.FloatField(help_text="training time the campaign's runs used")
    longest_start_delay_s = serializers.FloatField(
        allow_null=True, help_text="the longest a run waited for a training slot"
    )
    mean_run_s = serializers.FloatField(allow_null=True)
    eta_seconds = serializers.FloatField(allow_null=True)
    done_fraction = serializers.FloatField()


class CampaignOutputSerializer(serializers.ModelSerializer[Campaign]):
    dataset = serializers.CharField(source="dataset_name", read_only=True)
    selection = serializers.JSONField(read_only=True)
    recipe = serializers.JSONField(read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)  # type: ignore[var-annotated]
    progress = serializers.SerializerMethodField()

    class Meta:
        model = Campaign
        fields = [
            "id", "name", "model_name", "dataset", "selection", "recipe", "target", "trigger",
            "interval_seconds", "weight", "status", "rounds", "next_round_at", "progress",
            "created_by", "created_at", "finished_at",
        ]  # fmt: skip

    @extend_schema_field(ProgressSerializer)
    def get_progress(self, campaign: Campaign) -> dict[str, Any]:
        return ProgressSerializer(services.campaign_progress(campaign)).data


class ItemRunSerializer(serializers.ModelSerializer[Any]):
    class Meta:
        from apps.training.models import TrainingRun

        model = TrainingRun
        fields = ["id", "status", "base_model", "started_at", "finished_at"]
        read_only_fields = fields


class GateResultSerializer(serializers.Serializer[Any]):
    gate = serializers.CharField(help_text="policy, latency budget, or regression vs ...")
    dataset = serializers.CharField(allow_null=True)
    dataset_name = serializers.CharField(allow_null=True, required=False)
    metric = serializers.CharField()
    op = serializers.CharField()
    threshold = serializers.FloatField()
    value = serializers.FloatField(allow_null=True)
    passed = serializers.BooleanField()
    champion_value = serializers.FloatField(required=False)
    delta = serializers.SerializerMethodField(
        help_text="value minus the champion's (or the yardstick's), on a regression gate"
    )

    def get_delta(self, row: dict[str, Any]) -> float | None:
        delta = champion_delta(row)
        return None if delta is None else round(delta, 4)


class ItemPromotionSerializer(serializers.ModelSerializer[PromotionRequest]):
    gates = GateResultSerializer(source="gate_results", many=True, read_only=True)
    passed = serializers.SerializerMethodField()
    regressed = serializers.SerializerMethodField()

    class Meta:
        model = PromotionRequest
        fields = [
            "id", "status", "model_version", "artifact_sha256", "gates", "passed", "regressed",
            "champion",
        ]  # fmt: skip
        read_only_fields = fields

    def get_passed(self, promotion: PromotionRequest) -> bool:
        rows = promotion.gate_results
        return bool(rows) and all(r.get("passed") for r in rows)

    def get_regressed(self, promotion: PromotionRequest) -> bool:
        """Measured worse than the champion (or the yardstick) on a regression metric."""
        return services.regressed(promotion)


class ItemOutputSerializer(serializers.ModelSerializer[CampaignItem]):
    tenant = serializers.CharField(source="tenant.slug", read_only=True)
    status = serializers.CharField(read_only=True, help_text="state, or the promotion's status")
    dataset_version = serializers.CharField(
        source="dataset_version_id", read_only=True, allow_null=True
    )
    run = ItemRunSerializer(read_only=True, allow_null=True)
    promotion = ItemPromotionSerializer(read_only=True, allow_null=True)

    class Meta:
        model = CampaignItem
        fields = [
            "id", "tenant", "trigger_key", "status", "state", "skip_reason", "detail",
            "dataset_version", "run", "promotion", "created_at", "updated_at",
        ]  # fmt: skip


class CampaignFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=CampaignStatus.choices)
    model = django_filters.CharFilter(field_name="model_name")

    class Meta:
        model = Campaign
        fields = ["status", "model"]


ITEM_STATUSES = [*ItemState.choices, *PromotionStatus.choices]


class ItemFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(
        choices=sorted(set(ITEM_STATUSES)), help_text="the item's status as listed"
    )
    tenant = django_filters.CharFilter(field_name="tenant__slug")
    skip_reason = django_filters.ChoiceFilter(choices=SkipReason.choices)

    class Meta:
        model = CampaignItem
        fields = ["status", "tenant", "skip_reason"]


class CampaignScopedMixin:
    kwargs: dict[str, Any]

    def get_campaign(self) -> Campaign:
        campaign = Campaign.objects.filter(pk=self.kwargs["campaign_id"]).first()
        if campaign is None:
            raise Http404("No such campaign.")
        return campaign


class CampaignListCreateApi(generics.ListAPIView[Campaign]):
    """Staff: every campaign, newest first (``?status=``, ``?model=``); POST starts one."""

    serializer_class = CampaignOutputSerializer
    permission_classes = default_permissions_and(OrgOperator)
    filterset_class = CampaignFilter
    queryset = Campaign.objects.select_related("created_by")

    @extend_schema(request=CampaignInputSerializer, responses={201: CampaignOutputSerializer})
    def post(self, request: Request) -> Response:
        data = CampaignInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        campaign = services.campaign_create(
            actor=request.user, via=request_via(request), **data.validated_data
        )
        campaign = self.get_queryset().get(pk=campaign.pk)
        return Response(CampaignOutputSerializer(campaign).data, status=status.HTTP_201_CREATED)


class CampaignDetailApi(CampaignScopedMixin, generics.GenericAPIView[Campaign]):
    serializer_class = CampaignOutputSerializer
    permission_classes = default_permissions_and(OrgOperatorOrReviewer)
    queryset = Campaign.objects.all()

    def get(self, request: Request, campaign_id: str) -> Response:
        return Response(CampaignOutputSerializer(self.get_campaign()).data)


class ItemPagination(Pagination):
    page_size = 100


class CampaignItemListApi(CampaignScopedMixin, generics.ListAPIView[CampaignItem]):
    """One row per tenant and firing: its status, why it was skipped, its run and its
    promotion request with every gate (value, threshold, pass) and a regressed flag."""

    serializer_class = ItemOutputSerializer
    permission_classes = default_permissions_and(OrgOperatorOrReviewer)
    filterset_class = ItemFilter
    pagination_class = ItemPagination
    queryset = CampaignItem.objects.none()

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return CampaignItem.objects.none()
        return services.items_of(self.get_campaign()).order_by("tenant__slug", "created_at")


class CampaignCancelApi(CampaignScopedMixin, generics.GenericAPIView[Campaign]):
    serializer_class = CampaignOutputSerializer
    permission_classes = default_permissions_and(OrgOperator)
    queryset = Campaign.objects.all()

    @extend_schema(request=None, responses=CampaignOutputSerializer)
    def post(self, request: Request, campaign_id: str) -> Response:
        services.campaign_cancel(
            actor=request.user, campaign=self.get_campaign(), via=request_via(request)
        )
        return Response(CampaignOutputSerializer(self.get_campaign()).data)


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "enum": ["passing"]},
            {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": MAX_LISTED_PROMOTIONS,
            },
        ],
        "description": '"passing": every request of the campaign awaiting approval (its gates '
        "passed); or the promotion request ids to decide.",
    }
)
class PromotionSelectionField(serializers.Field):  # type: ignore[type-arg]
    def to_internal_value(self, data: Any) -> str | list[str]:
        if data == "passing":
            return "passing"
        if (
            not isinstance(data, list)
            or not data
            or len(data) > MAX_LISTED_PROMOTIONS
            or not _plain_strings(data)
        ):
            raise serializers.ValidationError('"passing", or a list of promotion request ids.')
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class DecisionInputSerializer(serializers.Serializer[Any]):
    promotions = PromotionSelectionField()
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=5000)


class DecidedSerializer(serializers.Serializer[Any]):
    promotion = serializers.CharField()
    tenant = serializers.CharField()
    status = serializers.CharField()


class RefusedSerializer(serializers.Serializer[Any]):
    promotion = serializers.CharField()
    tenant = serializers.CharField()
    code = serializers.CharField(help_text="four_eyes, trainer_cannot_approve, not_reviewer, ...")
    message = serializers.CharField()


class DecisionOutputSerializer(serializers.Serializer[Any]):
    decided = DecidedSerializer(many=True)
    failed = RefusedSerializer(many=True, help_text="the requests not decided, and why")


class _CampaignDecideApi(CampaignScopedMixin, generics.GenericAPIView[Campaign]):
    serializer_class = DecisionOutputSerializer
    permission_classes = default_permissions_and(OrgOperatorOrReviewer)
    queryset = Campaign.objects.all()
    approve = True

    def post(self, request: Request, campaign_id: str) -> Response:
        data = DecisionInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        result = services.campaign_decide(
            actor=request.user,
            campaign=self.get_campaign(),
            approve=self.approve,
            via=request_via(request),
            **data.validated_data,
        )
        return Response(DecisionOutputSerializer(result).data)


class CampaignApproveApi(_CampaignDecideApi):
    """Approve the named requests, or all that passed their gates; each is its own four-eyes
    decision bound to its artifact, so the refused ones are listed with their reason."""

    @extend_schema(request=DecisionInputSerializer, responses=DecisionOutputSerializer)
    def post(self, request: Request, campaign_id: str) -> Response:
        return super().post(request, campaign_id)


class CampaignRejectApi(_CampaignDecideApi):
    approve = False

    @extend_schema(request=DecisionInputSerializer, responses=DecisionOutputSerializer)
    def post(self, request: Request, campaign_id: str) -> Response:
        return super().post(request, campaign_id)
