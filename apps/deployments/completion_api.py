"""``POST models/{name}/complete``: a reply's next words by the tenant's autocomplete model.

The door checks everything a replica would refuse (limits from
:mod:`worker.autocomplete_text`, the one definition the replicas use too), so every bad
request is a 400 naming its field here and none reaches the fleet.
"""

from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.deployments import fleet, selectors
from apps.deployments.models import CompletionStrategy, Environment
from apps.tenants.models import Role
from apps.tenants.scoping import TenantScopedMixin
from worker import autocomplete_text as limits
from worker.serving.autocomplete import SESSION_ID_MAX_CHARS, TOP_K_LIMIT

# torch.manual_seed takes any 64-bit value; a JSON client's integers are safe to 2**53.
SEED_MAX = 2**31 - 1


class CompleteInputSerializer(serializers.Serializer[Any]):
    prefix = serializers.CharField(
        trim_whitespace=False,
        max_length=limits.PREFIX_MAX_CHARS,
        help_text="what the agent typed so far; may end mid-word (the completion then "
        "starts with the rest of that word)",
    )
    # The API's name; DRF moves declared fields off the class, so no clash at run time.
    context = serializers.CharField(  # type: ignore[assignment]
        required=False,
        default="",
        allow_blank=True,
        trim_whitespace=False,
        max_length=limits.CONTEXT_MAX_CHARS,
        help_text="the customer message being answered (empty: none)",
    )
    max_tokens = serializers.IntegerField(
        min_value=1, max_value=limits.MAX_TOKENS_LIMIT, default=limits.MAX_TOKENS_DEFAULT
    )
    n = serializers.IntegerField(
        min_value=1,
        max_value=limits.N_LIMIT,
        default=1,
        help_text="completions wanted, best first (greedy: the greedy one, then ones "
        "starting with the next most likely other words)",
    )
    strategy = serializers.ChoiceField(
        choices=CompletionStrategy.choices, default=CompletionStrategy.GREEDY
    )
    top_k = serializers.IntegerField(
        min_value=1, max_value=TOP_K_LIMIT, default=5, help_text="`top_k` sampling only"
    )
    seed = serializers.IntegerField(
        min_value=0,
        max_value=SEED_MAX,
        default=0,
        help_text="`top_k` sampling only: the same seed gives the same completions",
    )
    session = serializers.CharField(
        required=False,
        default="",
        allow_blank=True,
        max_length=SESSION_ID_MAX_CHARS,
        help_text="any id of the caller's typing session: a call whose prompt extends the "
        "session's previous one reuses its cached keys and values (`cached_tokens`)",
    )
    environment = serializers.ChoiceField(
        choices=Environment.choices, default=Environment.PRODUCTION
    )

    def validate_prefix(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("The prefix must not be empty.")
        return value


CompleteOutputSerializer = inline_serializer(
    "CompleteOutput",
    {
        "model": serializers.CharField(),
        "model_version": serializers.CharField(),
        "version": serializers.IntegerField(),
        "environment": serializers.CharField(),
        "completions": serializers.ListField(
            child=inline_serializer(
                "Completion",
                {
                    "text": serializers.CharField(
                        help_text="what follows the prefix (the rest of a word it ends in "
                        "first), up to the end of a sentence or max_tokens"
                    ),
                    "score": serializers.FloatField(
                        help_text="mean log-probability per generated token"
                    ),
                    "tokens": serializers.IntegerField(
                        help_text="tokens generated (the rest of a word the prefix ends in, "
                        "and the end of the reply, included)"
                    ),
                },
            ),
            help_text="best first",
        ),
        "cached_tokens": serializers.IntegerField(
            help_text="prompt tokens whose keys/values came from the session's previous call "
            "(0 without a session, or when it was not cached)"
        ),
        "latency_ms": serializers.FloatField(),
    },
)


class ModelCompleteApi(TenantScopedMixin, APIView):
    """Complete an agent's reply with the tenant's autocomplete model as its environment's
    warm deployment serves it: greedy by default (deterministic), beam search or top-k
    sampling on request; a completion stops at the end of a sentence or after
    ``max_tokens`` tokens. Name a ``session`` to have the next call of that session reuse
    this one's cache."""

    required_roles = {"POST": Role.VIEWER}

    @extend_schema(
        request=CompleteInputSerializer,
        responses={
            200: CompleteOutputSerializer,
            409: OpenApiResponse(
                description="Not an autocomplete model (`not_autocomplete`), or no warm "
                "deployment in that environment (`not_warm`, naming the latest status)."
            ),
            503: OpenApiResponse(
                description="No replica answered (`model_unavailable`): the fleet is "
                "recovering or unreachable; see `Retry-After`."
            ),
        },
    )
    def post(self, request: Request, tenant: str, name: str) -> Response:
        model = selectors.registered_model(tenant=self.tenant, name=name)
        if model is None:
            raise Http404("No such model.")
        data = CompleteInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(complete(self.tenant, model, data.validated_data))


def complete(tenant: Any, model: Any, checked: dict[str, Any]) -> dict[str, Any]:
    """The fleet's answer to a checked request (the API's and the dashboard's)."""
    fields = dict(checked)
    environment = fields.pop("environment", Environment.PRODUCTION)
    return fleet.complete(tenant=tenant, model=model, environment=environment, **fields)
