"""The deployment page's completion box (an autocomplete deployment): suggestions as you type.

``static/js/autocomplete.js`` sends what is typed, debounced, to :func:`deployment_complete`
(``POST /t/<slug>/deployments/<id>/complete/``, behind the session login, the tenant's
deployments only) with a session id of the page's own, so each call reuses the previous
one's cache on the replica; it shows the suggestion, its latency and how many prompt
tokens were reused. Without script the box is a plain form: ``?prefix=`` renders the page
with the completion (:func:`completion_box`). Both check the request with the REST API's
serializer and call the same service, so the box answers what ``POST
models/{name}/complete`` answers.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from apps.core.errors import DomainError, ServiceUnavailable
from apps.deployments import selectors
from apps.deployments.completion_api import CompleteInputSerializer, complete
from apps.deployments.models import SERVING, Deployment
from apps.tenants.dashboard import tenant_view
from apps.tenants.scoping import TenantAccess

AUTOCOMPLETE = "autocomplete"
# What the box asks for: the API's defaults but a shorter completion (a suggestion).
BOX_MAX_TOKENS = 8


def _checked(deployment: Deployment, source: Any) -> CompleteInputSerializer:
    return CompleteInputSerializer(
        data={
            "prefix": source.get("prefix", ""),
            "context": source.get("context", ""),
            "session": source.get("session", ""),
            "max_tokens": BOX_MAX_TOKENS,
            "environment": deployment.environment,
        }
    )


def _error(code: str, message: str, status: int, fields: Any = None) -> JsonResponse:
    return JsonResponse(
        {"error": {"code": code, "message": message, "fields": fields or {}}}, status=status
    )


def completion_box(request: HttpRequest, access: TenantAccess, deployment: Deployment) -> Any:
    """An autocomplete deployment's box, with the completion of ``?prefix=`` when given
    (the page without script); None for other models."""
    model = deployment.model_version.registered_model
    if model.kind != AUTOCOMPLETE:
        return None
    box: dict[str, Any] = {
        "live": deployment.status in SERVING,
        "prefix": request.GET.get("prefix", ""),
        "context": request.GET.get("context", ""),
        "answer": None,
        "error": "",
    }
    if not box["prefix"].strip() or not box["live"]:
        return box
    data = _checked(deployment, request.GET)
    if not data.is_valid():
        box["error"] = "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in data.errors.items())
        return box
    try:
        box["answer"] = complete(access.tenant, model, data.validated_data)
    except (DomainError, ServiceUnavailable) as exc:
        box["error"] = exc.message
    return box


@require_POST
@tenant_view
def deployment_complete(
    request: HttpRequest, access: TenantAccess, deployment_id: str
) -> JsonResponse:
    """The box's JSON: the REST API's answer for the deployment's model and environment,
    or ``{"error": {"code", "message", "fields"}}`` with its status (400, 409, 503)."""
    deployment = selectors.deployments_for(access.tenant).filter(pk=deployment_id).first()
    if deployment is None:
        return _error("not_found", "No such deployment.", 404)
    model = deployment.model_version.registered_model
    if model.kind != AUTOCOMPLETE:
        return _error("not_autocomplete", f"{model.name} is a {model.kind} model.", 409)
    data = _checked(deployment, request.POST)
    if not data.is_valid():
        return _error("invalid", "Invalid input.", 400, data.errors)
    try:
        return JsonResponse(complete(access.tenant, model, data.validated_data))
    except DomainError as exc:
        return _error(exc.code, exc.message, 409)
    except ServiceUnavailable as exc:
        return _error(exc.code, exc.message, 503)
