"""Writes for tenants, memberships, tokens and user accounts. Each is atomic and audited."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import DomainError
from apps.tenants.models import ApiToken, Membership, Role, Tenant, hash_token


@transaction.atomic
def tenant_create(
    *,
    actor: Any,
    slug: str,
    name: str,
    domain: str = "",
    admins: Sequence[Any] = (),
    via: str = "",
) -> Tenant:
    """Create a tenant with its first admins (staff onboarding a customer)."""
    if Tenant.objects.filter(slug=slug).exists():
        raise DomainError(f"A tenant with slug '{slug}' already exists.", code="exists")
    tenant = Tenant.objects.create(slug=slug, name=name, domain=domain)
    first = list(dict.fromkeys(admins))
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="tenant.create",
        obj=tenant,
        after={
            "slug": slug,
            "name": name,
            "domain": domain,
            "admins": [u.get_username() for u in first],
        },
        via=via,
    )
    for user in first:
        membership_add(
            actor=actor,
            tenant=tenant,
            user=user,
            role=Role.ADMIN,
            as_staff=bool(getattr(actor, "is_staff", False)),
            via=via,
        )
    return tenant


def _staff_mark(data: dict[str, Any], *, actor: Any, as_staff: bool) -> dict[str, Any]:
    """Mark a change a staff user made with no admin role of their own in the tenant."""
    if not as_staff:
        return data
    if not getattr(actor, "is_staff", False):
        # The doors grant as_staff only to staff; a caller that claims it otherwise is a bug.
        raise DomainError("Only staff users act as staff.", code="not_staff")
    return {**data, "as_staff": True}


def _admins(tenant: Tenant) -> int:
    return Membership.objects.filter(tenant=tenant, role=Role.ADMIN).count()


@transaction.atomic
def membership_add(
    *, actor: Any, tenant: Tenant, user: Any, role: Role, as_staff: bool = False, via: str = ""
) -> Membership:
    if Membership.objects.filter(tenant=tenant, user=user).exists():
        raise DomainError(
            f"'{user.get_username()}' is already a member of '{tenant.slug}'.", code="exists"
        )
    membership = Membership.objects.create(tenant=tenant, user=user, role=role)
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="member.add",
        obj=membership,
        after=_staff_mark(
            {"username": user.get_username(), "role": role.value}, actor=actor, as_staff=as_staff
        ),
        via=via,
    )
    return membership


@transaction.atomic
def membership_change_role(
    *, actor: Any, membership: Membership, role: Role, as_staff: bool = False, via: str = ""
) -> Membership:
    # Lock the tenant's admin rows so two admins demoting each other cannot leave none.
    locked = Membership.objects.select_for_update().get(pk=membership.pk)
    list(Membership.objects.select_for_update().filter(tenant_id=locked.tenant_id, role=Role.ADMIN))
    before = locked.role
    if before == role:
        return locked
    if before == Role.ADMIN and _admins(locked.tenant) <= 1:
        raise DomainError(
            "A tenant needs at least one admin; make someone else admin first.", code="last_admin"
        )
    locked.role = role
    locked.save(update_fields=["role"])
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="member.change_role",
        obj=locked,
        before={"role": before},
        after=_staff_mark({"role": role.value}, actor=actor, as_staff=as_staff),
        via=via,
    )
    return locked


@transaction.atomic
def membership_remove(
    *, actor: Any, membership: Membership, as_staff: bool = False, via: str = ""
) -> None:
    locked = Membership.objects.select_for_update().get(pk=membership.pk)
    list(Membership.objects.select_for_update().filter(tenant_id=locked.tenant_id, role=Role.ADMIN))
    if locked.role == Role.ADMIN and _admins(locked.tenant) <= 1:
        raise DomainError(
            "A tenant needs at least one admin; the last one cannot be removed.", code="last_admin"
        )
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="member.remove",
        obj=locked,
        before={"username": locked.user.get_username(), "role": locked.role},
        after=_staff_mark({}, actor=actor, as_staff=as_staff) or None,
        via=via,
    )
    # Tokens limited to this tenant stop working with the membership.
    ApiToken.objects.filter(user=locked.user, tenant=locked.tenant, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    locked.delete()


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    secret: str


@transaction.atomic
def token_create(
    *,
    user: Any,
    name: str,
    tenant: Tenant | None = None,
    expires_at: datetime | None = None,
    via: str = "",
) -> IssuedToken:
    """Issue a token; the secret is returned once and only its hash is stored."""
    if expires_at is not None and expires_at <= timezone.now():
        raise DomainError("expires_at must be in the future.", code="invalid_expiry")
    if tenant is not None and not Membership.objects.filter(user=user, tenant=tenant).exists():
        raise DomainError("You are not a member of that tenant.", code="not_member")
    secret = "wb_" + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user,
        name=name,
        prefix=secret[:10],
        token_hash=hash_token(secret),
        tenant=tenant,
        expires_at=expires_at,
    )
    audit_record(
        actor=user,
        tenant=tenant,
        verb="token.create",
        obj=token,
        after={
            "name": name,
            "tenant": tenant.slug if tenant else None,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
        via=via,
    )
    return IssuedToken(token=token, secret=secret)


@transaction.atomic
def token_revoke(*, actor: Any, token: ApiToken, via: str = "") -> ApiToken:
    locked = ApiToken.objects.select_for_update().get(pk=token.pk)
    if locked.revoked_at is not None:
        return locked
    locked.revoked_at = timezone.now()
    locked.save(update_fields=["revoked_at"])
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="token.revoke",
        obj=locked,
        before={"revoked_at": None},
        after={"revoked_at": locked.revoked_at.isoformat()},
        via=via,
    )
    return locked


# --- user accounts ------------------------------------------------------------------------


@transaction.atomic
def user_create(
    *,
    username: str,
    email: str = "",
    password: str | None = None,
    is_staff: bool = False,
    actor: Any = None,
    via: str = "",
) -> Any:
    """Create an account; without a password it has none usable until its owner sets one
    through ``users.user_password_link``. The doors check the password against Django's
    validators first (``users.password_problems``)."""
    user_model = get_user_model()
    if user_model.objects.filter(username=username).exists():
        raise DomainError(f"A user named '{username}' already exists.", code="exists")
    user = user_model.objects.create_user(
        username=username, password=password, email=email, is_staff=is_staff
    )
    audit_record(
        actor=actor,
        tenant=None,
        verb="user.create",
        obj=user,
        after={
            "username": username,
            "email": email,
            "is_staff": is_staff,
            "password": "set" if password else "link",
        },
        via=via,
    )
    return user
