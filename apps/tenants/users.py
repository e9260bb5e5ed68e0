"""Staff's writes on user accounts: create one with a one-time password-set link,
set its password through that link, deactivate and reactivate it. Each is atomic and
audited (``tenant`` empty: an account belongs to no tenant)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import SESSION_KEY, get_user_model, password_validation
from django.contrib.auth.tokens import default_token_generator
from django.core.exceptions import ValidationError
from django.db import transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from oauth2_provider.models import get_access_token_model, get_refresh_token_model

from apps.audit.services import audit_record
from apps.core.errors import DomainError
from apps.notebooks.models import ACTIVE, NotebookServer
from apps.tenants.models import ApiToken, OrgRoleGrant
from apps.tenants.services import user_create
from apps.tenants.tasks import stop_user_notebooks


@dataclass(frozen=True)
class CreatedUser:
    user: Any
    password_link: str | None  # path of the one-time password-set page; None: has a password


def password_problems(*, password: str, username: str, email: str = "") -> list[str]:
    """What Django's password validators say of ``password`` for this new account (none:
    it may be used). The doors call it, to answer a 400 naming the password field."""
    candidate = get_user_model()(username=username, email=email)
    try:
        password_validation.validate_password(password, user=candidate)
    except ValidationError as exc:
        return list(exc.messages)
    return []


@transaction.atomic
def user_onboard(
    *, actor: Any, username: str, email: str, password: str | None = None, via: str = ""
) -> CreatedUser:
    """Staff create an account: with the given password, or with a one-time link for its
    owner to choose one (returned once, never stored)."""
    user = user_create(username=username, email=email, password=password, actor=actor, via=via)
    return CreatedUser(user=user, password_link=None if password else user_password_link(user=user))


def user_password_link(*, user: Any) -> str:
    """The path of a page where ``user`` sets a password, valid once.

    Built on Django's password-reset tokens: the token hashes the current password (and
    last login), so setting a password spends it, and it expires after
    ``PASSWORD_RESET_TIMEOUT``. Nothing is stored; the caller shows the link once.
    """
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    token = default_token_generator.make_token(user)
    return reverse("password-set-page", kwargs={"uidb64": uid, "token": token})


@transaction.atomic
def user_password_link_issue(*, actor: Any, user: Any, via: str = "") -> str:
    """A new one-time password-set link for an active account (the link itself is not
    recorded: it is a credential)."""
    if not user.is_active:
        raise DomainError(
            f"'{user.get_username()}' is deactivated; reactivate the account first.",
            code="inactive",
        )
    audit_record(actor=actor, tenant=None, verb="user.password_link", obj=user, after={}, via=via)
    return user_password_link(user=user)


@transaction.atomic
def user_password_set(*, user: Any, password: str, via: str = "") -> Any:
    """The user chose a password through their one-time link (which it spends: the link's
    token hashes the old password). The door validated it."""
    user.set_password(password)
    user.save(update_fields=["password"])
    audit_record(actor=user, tenant=None, verb="user.password_set", obj=user, after={}, via=via)
    return user


@transaction.atomic
def user_set_active(*, actor: Any, user: Any, is_active: bool, via: str = "") -> Any:
    """Deactivate (or reactivate) an account.

    Deactivating ends every way in at once: the user's API tokens are revoked, their
    dashboard sessions deleted, their OAuth grants (JupyterHub's sign-in) removed, and
    their notebook servers are stopped by a task after commit (stopping talks to
    JupyterHub, which must not hold this transaction open or roll it back).
    """
    user_model = get_user_model()
    locked = user_model.objects.select_for_update().get(pk=user.pk)
    if locked.is_active == is_active:
        return locked
    if not is_active and actor is not None and locked.pk == actor.pk:
        raise DomainError("You cannot deactivate your own account.", code="self")
    locked.is_active = is_active
    locked.save(update_fields=["is_active"])
    after: dict[str, Any] = {"is_active": is_active}
    if not is_active:
        after["tokens_revoked"] = ApiToken.objects.filter(
            user=locked, revoked_at__isnull=True
        ).update(revoked_at=timezone.now())
        after["sessions_ended"] = _end_sessions(locked)
        after["oauth_tokens_revoked"] = _revoke_oauth(locked)
        after["notebooks_stopping"] = _stop_notebooks_on_commit(locked, actor)
    audit_record(
        actor=actor,
        tenant=None,
        verb="user.reactivate" if is_active else "user.deactivate",
        obj=locked,
        before={"is_active": not is_active},
        after={**after, "as_staff": True} if getattr(actor, "is_staff", False) else after,
        via=via,
    )
    return locked


def _end_sessions(user: Any) -> int:
    """Delete the user's stored sessions; the number deleted.

    Django keeps no index from user to session, so the live sessions are decoded one by
    one; deactivation is rare and sessions expire, so the scan stays small. (An inactive
    user's session is refused by the auth backend anyway; this removes it outright.)
    """
    store = import_module(settings.SESSION_ENGINE).SessionStore
    if not hasattr(store, "get_model_class"):  # cache or cookie sessions: nothing stored here
        return 0
    model = store.get_model_class()
    mine = []
    for key, data in (
        model.objects.filter(expire_date__gt=timezone.now())
        .values_list("session_key", "session_data")
        .iterator()
    ):
        if str(store().decode(data).get(SESSION_KEY)) == str(user.pk):
            mine.append(key)
    for key in mine:
        store(session_key=key).delete()  # also drops a cached copy (cached_db)
    return len(mine)


def _revoke_oauth(user: Any) -> int:
    """Delete the user's OAuth tokens (JupyterHub's sign-ins through the workbench)."""
    get_refresh_token_model().objects.filter(user=user).delete()
    access, _ = get_access_token_model().objects.filter(user=user).delete()
    return int(access)


def _stop_notebooks_on_commit(user: Any, actor: Any) -> list[str]:
    servers = list(
        NotebookServer.objects.filter(user=user, status__in=ACTIVE).values_list("pk", flat=True)
    )
    if servers:
        actor_id = actor.pk if actor is not None else None
        transaction.on_commit(lambda: stop_user_notebooks.delay(user.pk, actor_id))
    return servers


def org_roles_of(user: Any) -> list[str]:
    if not getattr(user, "is_authenticated", False):
        return []
    return sorted(OrgRoleGrant.objects.filter(user=user).values_list("role", flat=True))


def holds_org_role(user: Any, *roles: str) -> bool:
    """Whether the user was granted one of these org-level roles."""
    return OrgRoleGrant.objects.filter(user=user, role__in=roles).exists()


def has_org_role(user: Any, *roles: str) -> bool:
    """Whether the user may act with one of these org-level roles (staff may with all)."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    return bool(user.is_staff) or holds_org_role(user, *roles)


@transaction.atomic
def org_roles_set(*, actor: Any, user: Any, roles: list[str], via: str = "") -> list[str]:
    """Make ``roles`` the user's org-level roles (granted and revoked to match), audited."""
    before = org_roles_of(user)
    wanted = sorted(set(roles))
    OrgRoleGrant.objects.filter(user=user).exclude(role__in=wanted).delete()
    for role in wanted:
        OrgRoleGrant.objects.get_or_create(user=user, role=role)
    if before != wanted:
        audit_record(
            actor=actor,
            tenant=None,
            verb="user.org_roles",
            obj=user,
            before={"org_roles": before},
            after={"org_roles": wanted},
            via=via,
        )
    return wanted
