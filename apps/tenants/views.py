"""Dashboard pages for tenants: home, members and the user's API tokens."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from apps.core.errors import DomainError
from apps.tenants import services
from apps.tenants.dashboard import VIA, render_tenant, require_role, tenant_view
from apps.tenants.forms import MemberAddForm, MemberRoleForm, TokenCreateForm
from apps.tenants.models import Membership, Role
from apps.tenants.scoping import TenantAccess
from apps.tenants.selectors import members_of, memberships_for_user, tokens_of

SECTION = "members-page"


@login_required
def home(request: HttpRequest) -> HttpResponse:
    first = memberships_for_user(user=request.user).first()
    if first is None:
        return render(request, "tenants/no_tenant.html")
    return redirect("dataset-list-page", tenant=first.tenant.slug)


# --- members ----------------------------------------------------------------------------


def _member_or_404(access: TenantAccess, username: str) -> Membership:
    membership = members_of(tenant=access.tenant).filter(user__username=username).first()
    if membership is None:
        raise Http404("No such member.")
    return membership


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def members_page(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    is_admin = access.allows(Role.ADMIN)
    form = MemberAddForm() if is_admin else None
    status = 200
    if request.method == "POST":
        require_role(access, Role.ADMIN)
        form = MemberAddForm(request.POST)
        if form.is_valid():
            user = form.cleaned_data["username"]
            try:
                services.membership_add(
                    actor=request.user,
                    tenant=access.tenant,
                    user=user,
                    role=form.cleaned_data["role"],
                    via=VIA,
                )
            except DomainError as exc:
                messages.error(request, exc.message)
            else:
                messages.success(
                    request,
                    f"Added '{user.get_username()}' as {form.cleaned_data['role'].label.lower()}.",
                )
            return redirect("members-page", tenant=access.tenant.slug)
        status = 400
    return render_tenant(
        request,
        access,
        "tenants/members.html",
        {
            "members": members_of(tenant=access.tenant),
            "form": form,
            "is_admin": is_admin,
            "roles": Role.choices,
        },
        section=SECTION,
        status=status,
    )


@require_POST
@tenant_view
def member_change_role(request: HttpRequest, access: TenantAccess, username: str) -> HttpResponse:
    membership = _member_or_404(access, username)
    require_role(access, Role.ADMIN)
    form = MemberRoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose one of the roles: viewer, scientist, reviewer, admin.")
        return redirect("members-page", tenant=access.tenant.slug)
    role: Role = form.cleaned_data["role"]
    try:
        services.membership_change_role(
            actor=request.user, membership=membership, role=role, via=VIA
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"'{username}' is now {role.label.lower()}.")
    return redirect("members-page", tenant=access.tenant.slug)


@require_POST
@tenant_view
def member_remove(request: HttpRequest, access: TenantAccess, username: str) -> HttpResponse:
    membership = _member_or_404(access, username)
    require_role(access, Role.ADMIN)
    try:
        services.membership_remove(actor=request.user, membership=membership, via=VIA)
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("members-page", tenant=access.tenant.slug)
    messages.success(request, f"Removed '{username}' from {access.tenant.name}.")
    if membership.user_id == request.user.pk:
        return redirect("home")  # the tenant no longer exists for them
    return redirect("members-page", tenant=access.tenant.slug)


# --- API tokens -------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def tokens_page(request: HttpRequest) -> HttpResponse:
    form = TokenCreateForm(user=request.user)
    status = 200
    if request.method == "POST":
        form = TokenCreateForm(request.POST, user=request.user)
        if form.is_valid():
            try:
                issued = services.token_create(
                    user=request.user,
                    name=form.cleaned_data["name"],
                    tenant=form.cleaned_data["tenant"],
                    expires_at=form.expires_at(),
                    via=VIA,
                )
            except DomainError as exc:
                form.add_error(None, exc.message)
            else:
                # Rendered, not redirected: the secret exists only in this one response.
                response = render(
                    request,
                    "tenants/token_created.html",
                    {"token": issued.token, "secret": issued.secret, "nav_section": "tokens-page"},
                )
                response["Cache-Control"] = "no-store"
                return response
        status = 400
    return render(
        request,
        "tenants/tokens.html",
        {"tokens": tokens_of(user=request.user), "form": form, "nav_section": "tokens-page"},
        status=status,
    )


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: str) -> HttpResponse:
    token = tokens_of(user=request.user).filter(pk=token_id).first()
    if token is None:
        raise Http404("No such token.")
    services.token_revoke(actor=request.user, token=token, via=VIA)
    messages.success(request, f"Token '{token.name}' revoked; it no longer works.")
    return redirect("tokens-page")
