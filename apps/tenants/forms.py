"""Dashboard forms for members, API tokens, and (staff) tenants and user accounts."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.utils import timezone

from apps.tenants.models import Role, Tenant, slug_validator
from apps.tenants.selectors import active_users_named, tenants_for_user
from apps.tenants.users import password_problems


class MemberAddForm(forms.Form):
    username = forms.CharField(
        max_length=150, widget=forms.TextInput(attrs={"autocomplete": "off"})
    )
    role = forms.ChoiceField(choices=Role.choices, initial=Role.VIEWER)

    def clean_username(self) -> Any:
        value = str(self.cleaned_data["username"]).strip()
        user = get_user_model().objects.filter(username=value, is_active=True).first()
        if user is None:
            raise forms.ValidationError(f"No active user named '{value}'.")
        return user

    def clean_role(self) -> Role:
        return Role(self.cleaned_data["role"])


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)

    def clean_role(self) -> Role:
        return Role(self.cleaned_data["role"])


TENANT_MENU_MAX = 50


class TokenCreateForm(forms.Form):
    name = forms.CharField(
        max_length=100, widget=forms.TextInput(attrs={"placeholder": "ci-pipeline"})
    )
    tenant = forms.ModelChoiceField(
        queryset=Tenant.objects.none(),
        required=False,
        to_field_name="slug",
        empty_label="Any of my tenants",
        help_text="Limit the token to one tenant.",
    )
    expires_in_days = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=3650,
        label="Expires in (days)",
        help_text="Leave empty for a token that does not expire.",
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Only the user's own tenants are choices: another tenant's slug is "not a choice",
        # the same answer as a slug that does not exist.
        tenant_field = self.fields["tenant"]
        assert isinstance(tenant_field, forms.ModelChoiceField)
        tenant_field.queryset = tenants_for_user(user=user)
        # A menu of the user's tenants, read once; a member of more types the slug instead
        # (a select of 10,000 tenants is neither usable nor fast).
        mine = list(tenant_field.queryset[: TENANT_MENU_MAX + 1])
        if len(mine) > TENANT_MENU_MAX:
            tenant_field.widget = forms.TextInput(
                attrs={"placeholder": "a tenant's slug (empty: any of yours)"}
            )
            tenant_field.help_text = "Limit the token to one of your tenants: its slug."
        else:
            choices = [("", tenant_field.empty_label), *((t.slug, str(t)) for t in mine)]
            tenant_field.widget.choices = choices

    def expires_at(self) -> datetime | None:
        days = self.cleaned_data.get("expires_in_days")
        return timezone.now() + timedelta(days=int(days)) if days else None


# --- staff: tenants and user accounts ---------------------------------------------------


class TenantCreateForm(forms.Form):
    slug = forms.CharField(
        max_length=50,
        validators=[slug_validator],
        help_text="In URLs: lowercase letters, digits and hyphens.",
        widget=forms.TextInput(attrs={"placeholder": "acme", "autocomplete": "off"}),
    )
    name = forms.CharField(max_length=200, widget=forms.TextInput(attrs={"placeholder": "Acme"}))
    domain = forms.CharField(
        max_length=50, required=False, help_text="The customer's vertical, e.g. banking."
    )
    admins = forms.CharField(
        max_length=2000,
        label="First admins",
        help_text="Usernames, separated by commas or spaces; they manage the members.",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )

    def clean_admins(self) -> list[Any]:
        names = str(self.cleaned_data["admins"]).replace(",", " ").split()
        users, unknown = active_users_named(names)
        if unknown:
            raise forms.ValidationError(unknown)
        return users


class UserCreateForm(forms.Form):
    username = forms.CharField(
        max_length=150,
        validators=[get_user_model().username_validator],
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )
    email = forms.EmailField()
    password = forms.CharField(
        required=False,
        max_length=256,
        label="Initial password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="Leave empty to get a one-time link where the user chooses a password.",
    )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        password = cleaned.get("password")
        if password and cleaned.get("username"):
            for problem in password_problems(
                password=password, username=cleaned["username"], email=cleaned.get("email") or ""
            ):
                self.add_error("password", problem)
        return cleaned
