"""Dashboard pages for the model registry: the tenant's models and one model's versions."""

from __future__ import annotations

from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from apps.registry import selectors
from apps.registry.models import ArtifactFormat, ModelKind, ModelVersion
from apps.tenants.dashboard import paginate, render_tenant, tenant_view
from apps.tenants.models import OrgRole
from apps.tenants.scoping import TenantAccess
from apps.tenants.views import org_view

MODELS_PER_PAGE = 50
VERSIONS_PER_PAGE = 50
SECTION = "model-list-page"
# The metrics a version row shows, in this order (a version may record more).
SHOWN_METRICS = ("val_macro_f1", "val_accuracy", "val_loss")


@require_http_methods(["GET", "HEAD"])
@tenant_view
def model_list(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    page = paginate(request, selectors.models_for_tenant(tenant=access.tenant), MODELS_PER_PAGE)
    return render_tenant(
        request, access, "registry/model_list.html", {"page": page}, section=SECTION
    )


@require_http_methods(["GET", "HEAD"])
@tenant_view
def model_detail(request: HttpRequest, access: TenantAccess, name: str) -> HttpResponse:
    model = selectors.models_for_tenant(tenant=access.tenant).filter(name=name).first()
    if model is None:
        raise Http404("No such model.")
    page = paginate(request, selectors.versions_of_model(model=model), VERSIONS_PER_PAGE)
    versions = [
        {
            "version": version,
            "base": _base_name(version),
            "metrics": [
                (metric, version.metrics.get(metric) if isinstance(version.metrics, dict) else None)
                for metric in SHOWN_METRICS
            ],
        }
        for version in page.object_list
    ]
    return render_tenant(
        request,
        access,
        "registry/model_detail.html",
        {"model": model, "page": page, "versions": versions, "shown_metrics": SHOWN_METRICS},
        section=SECTION,
    )


def _base_name(version: ModelVersion) -> str:
    """The shared weights an adapter version runs on ("" for a full model)."""
    from worker import base_models

    if version.format != ArtifactFormat.ADAPTER:
        return ""
    try:
        return base_models.get(version.run.base_model).base or version.run.base_model
    except base_models.UnknownBaseModel:  # a base since taken out of the catalogue
        return version.run.base_model


@require_http_methods(["GET", "HEAD"])
@org_view(OrgRole.OPERATOR, OrgRole.REVIEWER)
def model_health_page(request: HttpRequest) -> HttpResponse:
    """Staff: model health across every tenant, one model kind at a time."""
    from apps.registry.health import health_report
    from apps.registry.health_api import HealthQuerySerializer

    query = HealthQuerySerializer(data=request.GET)
    params = query.validated_data if query.is_valid() else {"kind": "classifier"}
    served = health_report(**params)
    health = served.health
    spreads = [{"spread": s, "bars": _histogram_bars(s.histogram)} for s in health.metrics]
    context = {
        "health": health,
        "served": served,
        "spreads": spreads,
        "kinds": ModelKind.choices,
        "errors": query.errors,
        "nav_section": "model-health-page",
    }
    return render(request, "registry/health.html", context, status=400 if query.errors else 200)


HISTOGRAM_HEIGHT = 80  # the SVG's viewBox: 10 bars 20 wide, the tallest 78 high
HISTOGRAM_BAR_STEP = 20


def _histogram_bars(histogram: list[int]) -> list[dict[str, Any]]:
    tallest = max(1, max(histogram))
    bars = []
    for i, n in enumerate(histogram):
        height = round((HISTOGRAM_HEIGHT - 2) * n / tallest, 1)
        bars.append({"n": n, "low": i / len(histogram), "x": i * HISTOGRAM_BAR_STEP + 1,
                     "height": height, "y": round(HISTOGRAM_HEIGHT - height, 1)})  # fmt: skip
    return bars
