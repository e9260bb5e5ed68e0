"""Dashboard pages for deployments and the serving fleet.

``/t/<slug>/deployments/``: what is live per model and environment, then every deployment
(filters, pages) with its buttons. ``/t/<slug>/deployments/<id>/``: one deployment's status
timeline, history, warm-ups, alerts and provenance. ``/fleet/``: the serving fleet as the
backend reports it, other tenants' models counted but not named.

Buttons post to one view per verb, each calling its service: a warm-up (scientists and up),
a rollback or a retirement (reviewers and admins; the buttons are not shown to others and
their POST is a 403). A ``DomainError`` (nothing to roll back to, a deployment in progress)
is a 409: the page the button was on is rendered again with the service's message next to
the deployment. Success redirects with a message (POST/redirect/GET). Without script the
``data-confirm`` question is skipped and the POST goes straight through.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from apps.audit.models import AuditEvent
from apps.core.errors import DomainError, ServiceUnavailable
from apps.deployments import charts, dashboard_selectors, fleet, selectors, services
from apps.deployments.completion_views import completion_box
from apps.deployments.forms import DeploymentFilterForm
from apps.deployments.models import SERVING, Deployment, DeploymentStatus, FleetAlert
from apps.tenants.dashboard import VIA, paginate, render_tenant, require_role, tenant_view
from apps.tenants.models import Role
from apps.tenants.scoping import TenantAccess
from apps.tenants.selectors import memberships_for_user

log = logging.getLogger(__name__)

SECTION = "deployment-list-page"
FLEET_SECTION = "fleet-page"
PER_PAGE = 25
WARMUPS_SHOWN = 50
ALERTS_SHOWN = 20
IN_PROGRESS = (DeploymentStatus.PENDING, DeploymentStatus.LOADING)


# --- what each member may do to a deployment ----------------------------------------------


@dataclass(frozen=True)
class Buttons:
    warmup: bool
    rollback: bool
    retire: bool
    rollback_to: Deployment | None  # the version a rollback would put back

    @property
    def any(self) -> bool:
        return self.warmup or self.rollback or self.retire


def _buttons(access: TenantAccess, deployment: Deployment) -> Buttons:
    warm = deployment.status == DeploymentStatus.WARM
    serving = deployment.status in SERVING
    reviewer = access.allows(Role.REVIEWER)
    # One query, and only for a warm deployment a reviewer looks at: the list has at most
    # one warm row per model and environment.
    target = selectors.rollback_target(deployment) if warm and reviewer else None
    return Buttons(
        warmup=serving and access.allows(Role.SCIENTIST),
        rollback=target is not None,
        retire=reviewer
        and (
            deployment.status in (*SERVING, DeploymentStatus.FAILED)
            or (deployment.status == DeploymentStatus.RETIRED and deployment.standby)
        ),
        rollback_to=target,
    )


@dataclass(frozen=True)
class Row:
    deployment: Deployment
    buttons: Buttons
    error: str  # the service's refusal of the last button pressed on this row


def _deployment_or_404(access: TenantAccess, deployment_id: str) -> Deployment:
    deployment = (
        dashboard_selectors.deployments_listed(access.tenant)
        .select_related("replaces__model_version", "promotion__requested_by")
        .filter(pk=deployment_id)
        .first()
    )
    if deployment is None:
        raise Http404("No such deployment.")
    return deployment


# --- the list -----------------------------------------------------------------------------


def _list_page(
    request: HttpRequest,
    access: TenantAccess,
    *,
    refused: tuple[str, str] | None = None,
    status: int = 200,
) -> HttpResponse:
    names = dashboard_selectors.deployed_model_names(access.tenant)
    form = DeploymentFilterForm(request.GET or None, model_names=names)
    queryset = dashboard_selectors.deployments_listed(access.tenant).filter(**form.lookups())
    page = paginate(request, queryset, PER_PAGE)
    rows = [
        Row(
            deployment=d,
            buttons=_buttons(access, d),
            error=refused[1] if refused is not None and refused[0] == d.pk else "",
        )
        for d in page.object_list
    ]
    live = dashboard_selectors.live_overview(access.tenant)
    # A refusal of a deployment that is not on this page is shown above the list.
    orphan = refused[1] if refused is not None and all(r.error == "" for r in rows) else ""
    context = {
        "live": live,
        "page": page,
        "rows": rows,
        "form": form,
        "filtered": bool(form.lookups()),
        "query": request.GET.urlencode(),
        "refused": orphan,
        "unassigned_alerts": dashboard_selectors.tenant_alerts_open(access.tenant).filter(
            deployment=None
        ),
        "can_warmup": access.allows(Role.SCIENTIST),
        "can_decide": access.allows(Role.REVIEWER),
        # Re-read while something loads; never on a refusal (its URL is the POST's).
        "refresh": status == 200
        and (
            any(r.latest.status in IN_PROGRESS for r in live)
            or any(r.deployment.status in IN_PROGRESS for r in rows)
        ),
    }
    return render_tenant(
        request, access, "deployments/list.html", context, section=SECTION, status=status
    )


@require_http_methods(["GET", "HEAD"])
@tenant_view
def deployment_list(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    return _list_page(request, access)


# --- one deployment -----------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    status: str
    label: str
    at: datetime | None
    state: str  # "done", "current", "failed" or "todo"
    note: str = ""


def _timeline(deployment: Deployment, events: list[AuditEvent]) -> list[Step]:
    """pending -> loading -> warm (or failed) -> retired, with when each happened."""
    failed_at = next((e.created_at for e in events if e.verb == "deployment.failed"), None)
    status = deployment.status
    reached_loading = deployment.claimed_at is not None or status != DeploymentStatus.PENDING
    by = deployment.created_by.get_username() if deployment.created_by else ""
    steps = [
        Step(
            "pending",
            "Created",
            deployment.created_at,
            "current" if status == DeploymentStatus.PENDING else "done",
            f"by {by}" if by else "",
        ),
        Step(
            "loading",
            "Loading",
            deployment.claimed_at,
            "current"
            if status == DeploymentStatus.LOADING
            else "done"
            if reached_loading
            else "todo",
        ),
    ]
    if status == DeploymentStatus.FAILED or (deployment.warm_at is None and failed_at):
        steps.append(Step("failed", "Failed", failed_at, "failed"))
    else:
        warm_state = "current" if status == DeploymentStatus.WARM else "todo"
        if deployment.warm_at is not None and status != DeploymentStatus.WARM:
            warm_state = "done"
        steps.append(Step("warm", "Warm", deployment.warm_at, warm_state))
    if status == DeploymentStatus.RETIRED:
        note = "standby: still loaded for a quick rollback" if deployment.standby else ""
        steps.append(Step("retired", "Retired", deployment.retired_at, "current", note))
    else:
        steps.append(Step("retired", "Retired", None, "todo"))
    return steps


HISTORY_TEXT = {
    "deployment.create": "created for its approved promotion",
    "deployment.rollback": "created as a rollback",
    "deployment.warm": "passed its warm-up and went live",
    "deployment.failed": "failed",
    "deployment.replaced": "replaced by a newer deployment",
    "deployment.retire": "retired",
    "deployment.warmup_requested": "warm-up requested",
    "deployment.degraded": "stopped being served (degraded)",
    "deployment.recovered": "served again, warm-up verified",
    "deployment.index_built": "its knowledge base was indexed",
    "deployment.reindex": "reindex requested",
    "deployment.index_staged": "the new index was built",
    "deployment.reindexed": "switched to the new index, warm-up verified",
    "deployment.reindex_failed": "reindex failed; the previous index serves on",
}


def _history(events: list[AuditEvent]) -> list[dict[str, Any]]:
    rows = []
    for event in events:
        after = event.after if isinstance(event.after, dict) else {}
        detail = ""
        if event.verb == "deployment.failed":
            detail = str(after.get("failure", ""))
        elif event.verb == "deployment.replaced" and after.get("replaced_by"):
            detail = f"by {after['replaced_by']}" + (
                ", kept as a standby" if after.get("standby") else ""
            )
        rows.append(
            {
                "event": event,
                "text": HISTORY_TEXT.get(event.verb, event.verb),
                "detail": detail,
                "who": event.actor_name or "system",
            }
        )
    return rows


def _detail_page(
    request: HttpRequest,
    access: TenantAccess,
    deployment: Deployment,
    *,
    refused: str = "",
    status: int = 200,
) -> HttpResponse:
    events = list(dashboard_selectors.deployment_history(deployment))
    warmups = list(deployment.warmups.all()[:WARMUPS_SHOWN])
    alerts: list[FleetAlert] = list(
        deployment.alerts.order_by("resolved_at", "-created_at")[:ALERTS_SHOWN]
    )
    chronological = list(reversed(warmups))
    context = {
        "deployment": deployment,
        "version": deployment.model_version,
        "buttons": _buttons(access, deployment),
        "timeline": _timeline(deployment, events),
        "history": _history(events),
        "warmups": warmups,
        "warmup_chart": charts.warmup_chart(
            [(w.latency_ms_p50, w.latency_ms_max, w.latency_budget_ms) for w in chronological],
            chart_id=f"warmup-chart-{deployment.pk}",
        ),
        "open_alerts": [a for a in alerts if a.resolved_at is None],
        "resolved_alerts": [a for a in alerts if a.resolved_at is not None],
        "replaced_by": list(dashboard_selectors.replaced_by(deployment)),
        "refused": refused,
        "refresh": status == 200 and deployment.status in IN_PROGRESS,
        "search": _search_box(request, access, deployment),
        "completion": completion_box(request, access, deployment),
    }
    return render_tenant(
        request, access, "deployments/detail.html", context, section=SECTION, status=status
    )


SEARCH_K_CHOICES = (3, 5, 10, 20)


def _search_box(
    request: HttpRequest, access: TenantAccess, deployment: Deployment
) -> dict[str, Any] | None:
    """An embedding deployment's search box (while it serves): the query of ``?q=``
    searched in its knowledge base as the search API does, the top ``k`` documents."""
    model = deployment.model_version.registered_model
    if model.kind != "embedding":
        return None
    box: dict[str, Any] = {
        "live": deployment.status in SERVING,
        "query": request.GET.get("q", "").strip()[: settings.PREDICT_MAX_INPUT_CHARS],
        "k": 5,
        "k_choices": SEARCH_K_CHOICES,
        "results": None,
        "error": "",
    }
    with contextlib.suppress(ValueError):
        box["k"] = max(1, min(100, int(request.GET.get("k", 5))))
    if not box["query"] or not box["live"]:
        return box
    try:
        found = fleet.search(
            tenant=access.tenant,
            model=model,
            query=box["query"],
            k=box["k"],
            environment=deployment.environment,
        )
    except (DomainError, ServiceUnavailable) as exc:
        box["error"] = exc.message
        return box
    box["results"] = found["results"]
    box["latency_ms"] = found["latency_ms"]
    return box


@require_http_methods(["GET", "HEAD"])
@tenant_view
def deployment_detail(
    request: HttpRequest, access: TenantAccess, deployment_id: str
) -> HttpResponse:
    return _detail_page(request, access, _deployment_or_404(access, deployment_id))


# --- the buttons --------------------------------------------------------------------------

Verb = Callable[..., Deployment]


def _button(
    role: Role, verb: Verb, said: Callable[[Deployment, Deployment], str]
) -> Callable[..., HttpResponse]:
    """The view of one button: ``verb`` (a service) on the deployment, for ``role`` and up."""

    @require_POST
    @tenant_view
    def press(request: HttpRequest, access: TenantAccess, deployment_id: str) -> HttpResponse:
        # 404 before 403: another tenant's id reads as unknown whatever the caller's role.
        deployment = _deployment_or_404(access, deployment_id)
        require_role(access, role)
        from_list = request.POST.get("back") == "list"
        try:
            result = verb(actor=request.user, deployment=deployment, via=VIA)
        except DomainError as exc:
            if from_list:
                refused = (deployment.pk, exc.message)
                return _list_page(request, access, refused=refused, status=409)
            fresh = _deployment_or_404(access, deployment.pk)
            return _detail_page(request, access, fresh, refused=exc.message, status=409)
        messages.success(request, said(deployment, result))
        if from_list:
            url = reverse("deployment-list-page", kwargs={"tenant": access.tenant.slug})
            query = request.GET.urlencode()
            return redirect(f"{url}?{query}" if query else url)
        # A rollback is a new deployment: follow it.
        return redirect(
            "deployment-detail-page", tenant=access.tenant.slug, deployment_id=result.pk
        )

    return press


def _warmup_said(deployment: Deployment, _: Deployment) -> str:
    return (
        f"Warm-up of {deployment.model_version} in {deployment.environment} requested; its "
        "result appears in the warm-up history within a few seconds."
    )


def _rollback_said(deployment: Deployment, rollback: Deployment) -> str:
    version = rollback.model_version
    return (
        f"Rolling {version.registered_model.name} in {deployment.environment} back to "
        f"v{version.number} ({rollback.pk}); v{deployment.model_version.number} keeps serving "
        "until it is warm."
    )


def _retire_said(deployment: Deployment, _: Deployment) -> str:
    if deployment.status == DeploymentStatus.WARM:
        return (
            f"{deployment.model_version} retired from {deployment.environment}: it no longer "
            "serves and is being unloaded from the fleet."
        )
    return f"{deployment.model_version} ({deployment.pk}) retired and unloaded from the fleet."


deployment_warmup = _button(Role.SCIENTIST, services.deployment_warmup_request, _warmup_said)
deployment_rollback = _button(Role.REVIEWER, services.deployment_rollback, _rollback_said)
deployment_retire = _button(Role.REVIEWER, services.deployment_retire, _retire_said)


# --- the fleet ----------------------------------------------------------------------------


def _published(status: dict[str, Any]) -> dict[str, Any]:
    """How old the shown status is, and whether a controller is driving the fleet."""
    age = status.get("age_seconds")
    controller = status.get("controller") or {}
    stale_after = 3 * settings.FLEET_RECONCILE_SECONDS + settings.FLEET_LEASE_SECONDS
    return {
        "age_seconds": age,
        "never": status.get("published_at") is None,
        "controller_alive": bool(controller.get("alive")),
        "stale": age is None or age > stale_after or not controller.get("alive"),
        "last_error": controller.get("last_error") or "",
    }


def _tenants_named(value: Any) -> set[str]:
    """Every tenant slug the published status names (its ``tenant`` entries)."""
    if isinstance(value, dict):
        named = {str(value["tenant"])} if isinstance(value.get("tenant"), str) else set()
        return named.union(*(_tenants_named(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_tenants_named(v) for v in value))
    return set()


@require_http_methods(["GET", "HEAD"])
@login_required
def fleet_page(request: HttpRequest) -> HttpResponse:
    """The serving fleet for any signed-in user; other tenants' models are only counted."""
    context: dict[str, Any] = {"nav_section": FLEET_SECTION}
    # What the fleet controller last published: the page never waits on the backend.
    status = fleet.fleet_status_for(request.user)
    context["published"] = _published(status)
    warmups = dashboard_selectors.last_warmups(charts.deployment_ids(status))
    # Which of the tenants named on the page are the user's (links to their deployments):
    # asked for those only, not read for every tenant the user belongs to.
    named = _tenants_named(status)
    member_of = set(
        memberships_for_user(user=request.user)
        .filter(tenant__slug__in=named)
        .values_list("tenant__slug", flat=True)
    )
    context.update({"fleet": charts.fleet_view(status, warmups), "member_of": member_of})
    return render(request, "deployments/fleet.html", context)
