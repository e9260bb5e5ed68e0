from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from apps.core import ids


class Role(models.TextChoices):
    VIEWER = "viewer", "Viewer"
    SCIENTIST = "scientist", "Scientist"
    REVIEWER = "reviewer", "Reviewer"
    ADMIN = "admin", "Admin"


# A higher rank includes everything a lower one may do (a reviewer may also launch runs).
ROLE_RANK = {Role.VIEWER: 0, Role.SCIENTIST: 1, Role.REVIEWER: 2, Role.ADMIN: 3}

slug_validator = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?$",
    "Use 1-50 lowercase letters, digits and inner hyphens.",
)


class Tenant(models.Model):
    """A customer of the SaaS company: owns datasets, runs and models, seen only by members."""

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_tenant_id, editable=False
    )
    slug = models.CharField(max_length=50, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    domain = models.CharField(max_length=50, blank=True, help_text="vertical, e.g. retail")
    max_concurrent_runs = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="training runs at once; empty: the site default"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    """A user's role inside one tenant; no row means the tenant does not exist for them."""

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_membership_id, editable=False
    )
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant__slug", "user__username"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="one_membership_per_user")
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"

    @property
    def rank(self) -> int:
        return ROLE_RANK[Role(self.role)]


def hash_token(secret: str) -> str:
    # Tokens are 256-bit random strings, so a plain (unsalted) sha256 is enough: there is
    # no dictionary to attack, and the lookup stays a single indexed equality.
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiToken(models.Model):
    """A personal API token: stored hashed, optionally limited to one tenant and a date."""

    id = models.CharField(primary_key=True, max_length=32, default=ids.new_token_id, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="first characters, to recognise a token")
    token_hash = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()


class OrgRole(models.TextChoices):
    """Roles over every tenant at once, granted by staff."""

    # Decides promotion requests in every tenant (four eyes still hold).
    REVIEWER = "reviewer", "Reviewer in every tenant"
    # Runs campaigns across tenants and sees cross-tenant model health.
    OPERATOR = "operator", "Operator of campaigns and model health"


class OrgRoleGrant(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="org_roles"
    )
    role = models.CharField(max_length=16, choices=OrgRole.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["role"]
        constraints = [models.UniqueConstraint(fields=["user", "role"], name="org_role_once")]

    def __str__(self) -> str:
        return f"{self.user_id}: {self.role}"
