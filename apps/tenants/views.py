"""Dashboard pages for tenants: home, members, the user's API tokens, and for staff the
tenants and user accounts (onboarding a customer), with the one-time password-set page."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.views.decorators.http import require_http_methods, require_POST

from apps.core.errors import DomainError
from apps.tenants import services, users
from apps.tenants.context_processors import SWITCHABLE, SWITCHER_SIZE, switch_href
from apps.tenants.dashboard import (
    VIA,
    member_management_view,
    paginate,
    render_tenant,
    require_role,
)
from apps.tenants.filters import TenantFilter, UserFilter
from apps.tenants.forms import (
    MemberAddForm,
    MemberRoleForm,
    TenantCreateForm,
    TokenCreateForm,
    UserCreateForm,
)
from apps.tenants.models import Membership, OrgRole, Role
from apps.tenants.scoping import TenantAccess
from apps.tenants.selectors import (
    members_of,
    memberships_for_user,
    tenants_all,
    tokens_of,
    users_all,
)

SECTION = "members-page"


MY_TENANTS_PER_PAGE = 50


@login_required
@require_http_methods(["GET", "HEAD"])
def my_tenants_page(request: HttpRequest) -> HttpResponse:
    """The signed-in user's tenants, searched by slug or name: where the switcher's search
    leads (and, with ``?partial=1``, the entries it shows as you type)."""
    query = request.GET.get("q", "").strip()[:100]
    section = request.GET.get("section", "")
    found = memberships_for_user(user=request.user)
    if query:
        found = found.filter(Q(tenant__slug__icontains=query) | Q(tenant__name__icontains=query))
    if request.GET.get("partial") == "1":
        entries = [(m, switch_href(m.tenant.slug, section)) for m in found[:SWITCHER_SIZE]]
        response = render(request, "tenants/_switcher_entries.html", {"entries": entries})
        response["Cache-Control"] = "no-store"
        return response
    page = paginate(request, found, MY_TENANTS_PER_PAGE)
    return render(
        request,
        "tenants/my_tenants.html",
        {
            "page": page,
            "rows": [(m, switch_href(m.tenant.slug, section)) for m in page.object_list],
            "q": query,
            "section": section if section in SWITCHABLE else "",
            "nav_section": "my-tenants-page",
        },
    )


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
@member_management_view
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
                    as_staff=access.as_staff,
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
@member_management_view
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
            actor=request.user, membership=membership, role=role, as_staff=access.as_staff, via=VIA
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"'{username}' is now {role.label.lower()}.")
    return redirect("members-page", tenant=access.tenant.slug)


@require_POST
@member_management_view
def member_remove(request: HttpRequest, access: TenantAccess, username: str) -> HttpResponse:
    membership = _member_or_404(access, username)
    require_role(access, Role.ADMIN)
    try:
        services.membership_remove(
            actor=request.user, membership=membership, as_staff=access.as_staff, via=VIA
        )
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("members-page", tenant=access.tenant.slug)
    messages.success(request, f"Removed '{username}' from {access.tenant.name}.")
    if membership.user_id == request.user.pk and not request.user.is_staff:
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


# --- staff: tenants and user accounts -----------------------------------------------------

ROWS_PER_PAGE = 50
STAFF_TEMPLATES = {"users-page": "tenants/users.html", "tenants-page": "tenants/tenants.html"}


def staff_view(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Signed in and staff; anyone else gets the 403 page saying so."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_staff:
            message = "Only staff (platform) users manage tenants and user accounts."
            return render(request, "403.html", {"exception": message}, status=403)
        return view(request, *args, **kwargs)

    return login_required(wrapper)


def org_view(*roles: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Signed in and staff, or holding one of these org-level roles; anyone else gets the
    403 page saying so."""

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not users.has_org_role(request.user, *roles):
                message = "Only staff and org-level roles work across tenants."
                return render(request, "403.html", {"exception": message}, status=403)
            return view(request, *args, **kwargs)

        return login_required(wrapper)

    return decorate


def _valid_for(seconds: int) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    return f"{max(1, seconds // 3600)} hours"


def _one_time_link_page(request: HttpRequest, user: Any, link: str, *, created: bool) -> Any:
    # Rendered, not redirected: the link exists only in this one response.
    response = render(
        request,
        "tenants/password_link.html",
        {
            "account": user,
            "link": request.build_absolute_uri(link),
            "created": created,
            "valid_for": _valid_for(settings.PASSWORD_RESET_TIMEOUT),
            "nav_section": "users-page",
        },
    )
    response["Cache-Control"] = "no-store"
    return response


def _staff_list(
    request: HttpRequest, section: str, filterset: Any, form: Any, status: int
) -> HttpResponse:
    """A staff list page: the filtered rows, a page of them, and the create form."""
    return render(
        request,
        STAFF_TEMPLATES[section],
        {
            "filter": filterset,
            "page": paginate(request, filterset.qs, ROWS_PER_PAGE),
            "form": form,
            "nav_section": section,
            "org_role_choices": OrgRole.choices,
        },
        status=status,
    )


@require_http_methods(["GET", "HEAD", "POST"])
@staff_view
def users_page(request: HttpRequest) -> HttpResponse:
    form = UserCreateForm()
    status = 200
    if request.method == "POST":
        form = UserCreateForm(request.POST)
        if form.is_valid():
            try:
                created = users.user_onboard(
                    actor=request.user,
                    username=form.cleaned_data["username"],
                    email=form.cleaned_data["email"],
                    password=form.cleaned_data["password"] or None,
                    via=VIA,
                )
            except DomainError as exc:
                form.add_error("username", exc.message)
            else:
                if created.password_link:
                    return _one_time_link_page(
                        request, created.user, created.password_link, created=True
                    )
                messages.success(request, f"Created '{created.user.get_username()}'.")
                return redirect("users-page")
        status = 400
    accounts = users_all().prefetch_related("org_roles")
    filterset = UserFilter(request.GET or None, queryset=accounts)
    return _staff_list(request, "users-page", filterset, form, status)


@require_POST
@staff_view
def user_org_roles(request: HttpRequest, username: str) -> HttpResponse:
    """Staff: make the ticked org-level roles the user's (granted and revoked to match)."""
    user = _account_or_404(username)
    wanted = request.POST.getlist("org_roles")
    unknown = sorted(set(wanted) - set(OrgRole.values))
    if unknown:
        messages.error(request, f"No org-level role named {', '.join(unknown)}; nothing changed.")
    else:
        roles = users.org_roles_set(actor=request.user, user=user, roles=wanted, via=VIA)
        named = ", ".join(roles) or "none"
        messages.success(request, f"{user.get_username()}'s org-level roles: {named}.")
    return redirect("users-page")


def _account_or_404(username: str) -> Any:
    user = users_all().filter(username=username).first()
    if user is None:
        raise Http404("No such user.")
    return user


@require_POST
@staff_view
def user_set_active(request: HttpRequest, username: str) -> HttpResponse:
    user = _account_or_404(username)
    is_active = request.POST.get("is_active") == "true"
    try:
        users.user_set_active(actor=request.user, user=user, is_active=is_active, via=VIA)
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(
            request,
            f"'{username}' can sign in again."
            if is_active
            else f"'{username}' is deactivated: tokens revoked, sessions ended, notebook "
            "servers stopping.",
        )
    return redirect("users-page")


@require_POST
@staff_view
def user_password_link(request: HttpRequest, username: str) -> HttpResponse:
    user = _account_or_404(username)
    try:
        link = users.user_password_link_issue(actor=request.user, user=user, via=VIA)
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("users-page")
    return _one_time_link_page(request, user, link, created=False)


@require_http_methods(["GET", "HEAD", "POST"])
@staff_view
def tenants_page(request: HttpRequest) -> HttpResponse:
    form = TenantCreateForm()
    status = 200
    if request.method == "POST":
        form = TenantCreateForm(request.POST)
        if form.is_valid():
            try:
                tenant = services.tenant_create(
                    actor=request.user,
                    slug=form.cleaned_data["slug"],
                    name=form.cleaned_data["name"],
                    domain=form.cleaned_data["domain"],
                    admins=form.cleaned_data["admins"],
                    via=VIA,
                )
            except DomainError as exc:
                form.add_error("slug", exc.message)
            else:
                messages.success(request, f"Created tenant '{tenant.name}'.")
                return redirect("members-page", tenant=tenant.slug)
        status = 400
    filterset = TenantFilter(request.GET or None, queryset=tenants_all())
    return _staff_list(request, "tenants-page", filterset, form, status)


class PasswordSetView(auth_views.PasswordResetConfirmView):
    """Where a new user (or one staff sent a new link) chooses a password, through the
    one-time link. Django's reset-confirm view, with two changes: a deactivated account's
    link does not work, and the password is saved by the service, which audits it."""

    template_name = "registration/password_set.html"
    success_url = reverse_lazy("password-set-done-page")

    def get_user(self, uidb64: str) -> Any:
        user = super().get_user(uidb64)
        return user if user is not None and user.is_active else None

    def form_valid(self, form: Any) -> HttpResponse:
        users.user_password_set(
            user=form.user, password=form.cleaned_data["new_password1"], via=VIA
        )
        del self.request.session[auth_views.INTERNAL_RESET_SESSION_TOKEN]
        return redirect(self.get_success_url())


@require_http_methods(["GET", "HEAD"])
def password_set_done(request: HttpRequest) -> HttpResponse:
    return render(request, "registration/password_set_done.html")
