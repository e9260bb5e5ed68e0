"""Dashboard pages: the user's notebook servers (start, stop, live status) and data access
(request, and for reviewers and admins grant, deny, revoke).

The notebooks page refreshes its live region (``?partial=1``) while a server starts, like
the runs pages; without script it shows a refresh link.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from apps.core.errors import DomainError, InvalidInput, ServiceUnavailable
from apps.datasets.selectors import datasets_for_tenant, versions_for_tenant
from apps.notebooks import grants, selectors, services
from apps.notebooks.forms import AccessDecisionForm, AccessRequestForm
from apps.notebooks.hub import public_url
from apps.notebooks.models import AccessStatus, NotebookServer, NotebookStatus
from apps.tenants.dashboard import VIA, paginate, render_tenant, require_role, tenant_view
from apps.tenants.models import Role
from apps.tenants.scoping import TenantAccess

SECTION = "notebook-list-page"
ACCESS_SECTION = "access-list-page"
SERVERS_PER_PAGE = 20
REQUESTS_PER_PAGE = 25


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def _row(server: NotebookServer, now: Any) -> dict[str, Any]:
    end = server.stopped_at or now
    idle = (now - server.last_activity).total_seconds() if server.last_activity else None
    return {
        "server": server,
        "url": public_url(server),
        "age": _duration((end - server.created_at).total_seconds()),
        "idle": _duration(idle) if server.active else "—",
        "versions": list(server.datasets.all()),
    }


def _start(request: HttpRequest, access: TenantAccess) -> tuple[int, str]:
    """Start a server from the form; (status, error) where status 0 means started."""
    require_role(access, Role.SCIENTIST)
    ids = list(dict.fromkeys(request.POST.getlist("datasets")))
    found = {v.pk: v for v in versions_for_tenant(tenant=access.tenant).filter(pk__in=ids)}
    if len(found) != len(ids):
        return 400, "No such dataset version."
    try:
        services.notebook_start(
            actor=request.user, tenant=access.tenant, datasets=[found[i] for i in ids], via=VIA
        )
    except InvalidInput as exc:
        return 400, " ".join(exc.fields.get("datasets", [exc.message]))
    except DomainError as exc:
        return 409, exc.message
    except ServiceUnavailable as exc:
        return 503, exc.message
    return 0, ""


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def notebook_list(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    status = 200
    if request.method == "POST":
        status, error = _start(request, access)
        if status == 0:
            messages.info(
                request,
                "Your notebook server is starting; this page shows its link once it is ready "
                "(usually within half a minute).",
            )
            return redirect("notebook-list-page", tenant=access.tenant.slug)
        messages.error(request, error)
    hub_down = ""
    try:
        services.notebooks_sync(user=request.user)
    except ServiceUnavailable as exc:
        hub_down = exc.message
    servers = selectors.notebooks_of(tenant=access.tenant, user=request.user)
    page = paginate(request, servers, SERVERS_PER_PAGE)
    now = timezone.now()
    rows = [_row(server, now) for server in page.object_list]
    context: dict[str, Any] = {
        "page": page,
        "rows": rows,
        "live": any(row["server"].status == NotebookStatus.STARTING for row in rows),
        "hub_down": hub_down,
    }
    if request.GET.get("partial") == "1":
        response = render_tenant(
            request, access, "notebooks/_servers.html", context, section=SECTION
        )
        response["Cache-Control"] = "no-store"
        return response
    context.update(
        {
            "can_start": access.allows(Role.SCIENTIST),
            "granted": selectors.granted_versions(tenant=access.tenant, user=request.user),
            "limit": settings.NOTEBOOK_MAX_SERVERS_PER_USER,
        }
    )
    return render_tenant(
        request, access, "notebooks/list.html", context, section=SECTION, status=status
    )


@require_POST
@tenant_view
def notebook_stop(request: HttpRequest, access: TenantAccess, notebook_id: str) -> HttpResponse:
    server = (
        selectors.notebooks_of(tenant=access.tenant, user=request.user)
        .filter(pk=notebook_id)
        .first()
    )
    if server is None:
        raise Http404("No such notebook server.")
    require_role(access, Role.SCIENTIST)
    try:
        services.notebook_stop(actor=request.user, server=server, via=VIA)
    except (DomainError, ServiceUnavailable) as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Notebook server {server.pk} stopped; its token is revoked.")
    return redirect("notebook-list-page", tenant=access.tenant.slug)


# --- data access ------------------------------------------------------------------------


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def access_list(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    can_request = access.allows(Role.SCIENTIST)
    can_decide = access.allows(Role.REVIEWER)
    datasets = datasets_for_tenant(tenant=access.tenant)
    form = AccessRequestForm(datasets=datasets) if can_request else None
    status = 200
    if request.method == "POST":
        require_role(access, Role.SCIENTIST)
        form = AccessRequestForm(request.POST, datasets=datasets)
        if form.is_valid():
            try:
                grants.access_request_create(
                    actor=request.user, tenant=access.tenant, via=VIA, **form.cleaned_data
                )
            except (DomainError, InvalidInput) as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, "Access requested; a reviewer or admin decides.")
                return redirect("access-list-page", tenant=access.tenant.slug)
        status = 400
    requests = selectors.access_requests_for(
        tenant=access.tenant, user=None if can_decide else request.user
    )
    page = paginate(request, requests, REQUESTS_PER_PAGE)
    context = {
        "page": page,
        "form": form,
        "can_decide": can_decide,
        "decision_form": AccessDecisionForm(),
        "pending": AccessStatus.REQUESTED,
        "granted_status": AccessStatus.GRANTED,
    }
    return render_tenant(
        request, access, "notebooks/access.html", context, section=ACCESS_SECTION, status=status
    )


@require_POST
@tenant_view
def access_decide(request: HttpRequest, access: TenantAccess, request_id: str) -> HttpResponse:
    found = selectors.access_requests_for(tenant=access.tenant).filter(pk=request_id).first()
    if found is None:
        raise Http404("No such access request.")
    require_role(access, Role.REVIEWER)
    form = AccessDecisionForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(str(e) for errors in form.errors.values() for e in errors))
        return redirect("access-list-page", tenant=access.tenant.slug)
    decision = form.cleaned_data["decision"]
    comment = form.cleaned_data["comment"]
    try:
        if decision == "grant":
            grants.access_request_grant(
                actor=request.user,
                request=found,
                comment=comment,
                expires_at=form.cleaned_data["expires_at"],
                via=VIA,
            )
        elif decision == "deny":
            grants.access_request_deny(actor=request.user, request=found, comment=comment, via=VIA)
        else:
            grants.access_request_revoke(
                actor=request.user, request=found, comment=comment, via=VIA
            )
    except (DomainError, InvalidInput) as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Request {found.pk}: {decision} recorded.")
    return redirect("access-list-page", tenant=access.tenant.slug)
