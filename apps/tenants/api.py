from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.api import default_permissions_and
from apps.tenants import selectors, services, users
from apps.tenants.auth import request_via
from apps.tenants.filters import TenantFilter, UserFilter
from apps.tenants.models import ApiToken, Membership, OrgRole, Role, Tenant, slug_validator
from apps.tenants.scoping import TenantScopedMixin


class TenantOutputSerializer(serializers.ModelSerializer[Tenant]):
    role = serializers.SerializerMethodField()

    class Meta:
        model = Tenant
        fields = ["id", "slug", "name", "domain", "created_at", "role"]

    def get_role(self, tenant: Tenant) -> str | None:
        # The list annotates each row with the caller's role (one query for the page).
        if hasattr(tenant, "caller_role"):
            return str(tenant.caller_role) if tenant.caller_role is not None else None
        roles: dict[str, str] = self.context.get("roles", {})
        return roles.get(tenant.pk)


class TenantInputSerializer(serializers.Serializer[Any]):
    slug = serializers.CharField(max_length=50, validators=[slug_validator])
    name = serializers.CharField(max_length=200)
    domain = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")
    admins = serializers.ListField(
        child=serializers.CharField(max_length=150),
        required=False,
        default=list,
        max_length=50,
        help_text="usernames of the tenant's first admins (existing, active users)",
    )

    def validate_admins(self, value: list[str]) -> list[Any]:
        admins, unknown = selectors.active_users_named(value)
        if unknown:
            raise serializers.ValidationError(unknown)
        return admins


class TenantListCreateApi(generics.ListAPIView[Tenant]):
    serializer_class = TenantOutputSerializer
    filterset_class = TenantFilter

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return Tenant.objects.none()
        token = self.request.auth if isinstance(self.request.auth, ApiToken) else None
        # A token limited to one tenant stays limited to it, for staff too.
        limited = token is not None and token.tenant_id is not None
        if (
            self.request.user.is_staff
            and not limited
            and self.request.query_params.get("all") in ("true", "1")
        ):
            tenants = selectors.tenants_all()
        else:
            tenants = selectors.tenants_for_user(user=self.request.user, token=token)
        return selectors.with_caller_role(tenants, user=self.request.user)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "all",
                bool,
                description="staff only: every tenant, not only the caller's (`role` is null "
                "where the caller is no member)",
            )
        ]
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=TenantInputSerializer,
        responses={201: TenantOutputSerializer},
        description="Staff only. Creates the tenant with its first admins; an unknown "
        "username in `admins` is a 400 on that field and creates nothing.",
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not request.user.is_staff:
            return Response(
                {
                    "error": {
                        "code": "permission_denied",
                        "message": "Only staff users can create tenants.",
                        "fields": {},
                    }
                },
                status=status.HTTP_403_FORBIDDEN,
            )
        data = TenantInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        tenant = services.tenant_create(
            actor=request.user, via=request_via(request), **data.validated_data
        )
        return Response(TenantOutputSerializer(tenant).data, status=status.HTTP_201_CREATED)


class TenantDetailApi(TenantScopedMixin, generics.GenericAPIView[Tenant]):
    serializer_class = TenantOutputSerializer

    def get(self, request: Request, tenant: str) -> Response:
        context = {"roles": {self.tenant.pk: self.access.role.value}}
        return Response(TenantOutputSerializer(self.tenant, context=context).data)


class MemberOutputSerializer(serializers.ModelSerializer[Membership]):
    username = serializers.CharField(source="user.username")
    email = serializers.CharField(source="user.email")

    class Meta:
        model = Membership
        fields = ["id", "username", "email", "role", "created_at"]


class MemberInputSerializer(serializers.Serializer[Any]):
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=Role.choices)

    def validate_username(self, value: str) -> Any:
        user = get_user_model().objects.filter(username=value, is_active=True).first()
        if user is None:
            raise serializers.ValidationError(f"No active user named '{value}'.")
        return user


class MemberRoleSerializer(serializers.Serializer[Any]):
    role = serializers.ChoiceField(choices=Role.choices)


class MemberListCreateApi(TenantScopedMixin, generics.ListAPIView[Membership]):
    required_roles = {"POST": Role.ADMIN}
    staff_manages = True
    serializer_class = MemberOutputSerializer

    def get_queryset(self) -> Any:
        return selectors.members_of(tenant=self.tenant)

    @extend_schema(
        request=MemberInputSerializer,
        responses={201: MemberOutputSerializer},
        description="Tenant admins add members; so may staff, in any tenant (audited as staff).",
    )
    def post(self, request: Request, tenant: str) -> Response:
        data = MemberInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.membership_add(
            actor=request.user,
            tenant=self.tenant,
            user=data.validated_data["username"],
            role=Role(data.validated_data["role"]),
            as_staff=self.access.as_staff,
            via=request_via(request),
        )
        return Response(MemberOutputSerializer(membership).data, status=status.HTTP_201_CREATED)


class MemberDetailApi(TenantScopedMixin, generics.GenericAPIView[Membership]):
    required_roles = {"PATCH": Role.ADMIN, "DELETE": Role.ADMIN}
    staff_manages = True
    serializer_class = MemberOutputSerializer

    def get_object(self) -> Membership:
        return get_object_or_404(
            selectors.members_of(tenant=self.tenant), user__username=self.kwargs["username"]
        )

    def get(self, request: Request, tenant: str, username: str) -> Response:
        return Response(MemberOutputSerializer(self.get_object()).data)

    @extend_schema(request=MemberRoleSerializer, responses=MemberOutputSerializer)
    def patch(self, request: Request, tenant: str, username: str) -> Response:
        membership = self.get_object()
        data = MemberRoleSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.membership_change_role(
            actor=request.user,
            membership=membership,
            role=Role(data.validated_data["role"]),
            as_staff=self.access.as_staff,
            via=request_via(request),
        )
        return Response(MemberOutputSerializer(membership).data)

    def delete(self, request: Request, tenant: str, username: str) -> Response:
        services.membership_remove(
            actor=request.user,
            membership=self.get_object(),
            as_staff=self.access.as_staff,
            via=request_via(request),
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class TokenOutputSerializer(serializers.ModelSerializer[ApiToken]):
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )
    active = serializers.BooleanField(source="is_active", read_only=True)

    class Meta:
        model = ApiToken
        fields = [
            "id",
            "name",
            "prefix",
            "tenant",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "active",
        ]


class TokenCreatedSerializer(TokenOutputSerializer):
    token = serializers.CharField(help_text="The secret. Shown once; store it now.")

    class Meta(TokenOutputSerializer.Meta):
        fields = [*TokenOutputSerializer.Meta.fields, "token"]


class TokenInputSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=100)
    tenant = serializers.CharField(
        required=False,
        allow_null=True,
        default=None,
        help_text="slug of a tenant to limit the token to",
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)

    def validate_tenant(self, value: str | None) -> Tenant | None:
        if value is None:
            return None
        user = self.context["request"].user
        # Same message for "no such tenant" and "not yours": nothing leaks.
        tenant = selectors.tenants_for_user(user=user).filter(slug=value).first()
        if tenant is None:
            raise serializers.ValidationError(f"No tenant '{value}' among yours.")
        return tenant

    def validate_expires_at(self, value: Any) -> Any:
        from django.utils import timezone

        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("Must be in the future.")
        return value


class TokenListCreateApi(generics.ListAPIView[ApiToken]):
    serializer_class = TokenOutputSerializer

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return ApiToken.objects.none()
        return selectors.tokens_of(user=self.request.user)

    @extend_schema(request=TokenInputSerializer, responses={201: TokenCreatedSerializer})
    def post(self, request: Request) -> Response:
        data = TokenInputSerializer(data=request.data, context={"request": request})
        data.is_valid(raise_exception=True)
        issued = services.token_create(
            user=request.user, via=request_via(request), **data.validated_data
        )
        body = TokenOutputSerializer(issued.token).data
        body["token"] = issued.secret
        return Response(body, status=status.HTTP_201_CREATED)


class TokenDetailApi(generics.GenericAPIView[ApiToken]):
    serializer_class = TokenOutputSerializer

    def get_object(self) -> ApiToken:
        return get_object_or_404(
            selectors.tokens_of(user=self.request.user), pk=self.kwargs["token_id"]
        )

    def get(self, request: Request, token_id: str) -> Response:
        return Response(TokenOutputSerializer(self.get_object()).data)

    def delete(self, request: Request, token_id: str) -> Response:
        services.token_revoke(actor=request.user, token=self.get_object(), via=request_via(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- user accounts (staff) ---------------------------------------------------------------


class UserMembershipSerializer(serializers.ModelSerializer[Membership]):
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )

    class Meta:
        model = Membership
        fields = ["tenant", "role"]


class UserOutputSerializer(serializers.ModelSerializer[Any]):
    memberships = UserMembershipSerializer(many=True, read_only=True)
    has_password = serializers.SerializerMethodField()

    class Meta:
        model = get_user_model()
        fields = [
            "id",
            "username",
            "email",
            "is_active",
            "is_staff",
            "has_password",
            "date_joined",
            "last_login",
            "memberships",
        ]

    def get_has_password(self, user: Any) -> bool:
        return bool(user.has_usable_password())


class UserCreatedSerializer(UserOutputSerializer):
    password_link = serializers.URLField(
        allow_null=True,
        help_text="Without a password: the one-time link where the user sets one. Shown "
        "once; it stops working once used, or after PASSWORD_RESET_TIMEOUT.",
    )

    class Meta(UserOutputSerializer.Meta):
        fields = [*UserOutputSerializer.Meta.fields, "password_link"]


class UserInputSerializer(serializers.Serializer[Any]):
    username = serializers.CharField(
        max_length=150, validators=[get_user_model().username_validator]
    )
    email = serializers.EmailField()
    password = serializers.CharField(
        required=False,
        write_only=True,
        max_length=256,  # a passphrase fits; a megabyte would only cost hashing time
        style={"input_type": "password"},
        help_text="an initial password, checked by the password validators; leave it out "
        "to get a one-time link where the user chooses one",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        password = attrs.get("password")
        if password:
            problems = users.password_problems(
                password=password, username=attrs["username"], email=attrs["email"]
            )
            if problems:
                raise serializers.ValidationError({"password": problems})
        return attrs


class UserActiveSerializer(serializers.Serializer[Any]):
    is_active = serializers.BooleanField(
        help_text="false deactivates: revokes the user's tokens, ends their sessions and "
        "stops their notebook servers; true lets them in again"
    )


class PasswordLinkSerializer(serializers.Serializer[Any]):
    password_link = serializers.URLField()


class IsStaff(permissions.IsAdminUser):
    message = "Only staff (platform) users manage user accounts."


class HasOrgRole(permissions.BasePermission):
    """Staff, or a holder of one of ``roles`` (org-level: over every tenant)."""

    roles: tuple[str, ...] = ()
    message = "Only staff and org-level roles work across tenants."

    def has_permission(self, request: Any, view: Any) -> bool:
        return users.has_org_role(request.user, *self.roles)


class OrgOperator(HasOrgRole):
    roles = (OrgRole.OPERATOR,)
    message = "Only staff and org-level operators run campaigns and see model health."


class OrgOperatorOrReviewer(HasOrgRole):
    roles = (OrgRole.OPERATOR, OrgRole.REVIEWER)
    message = "Only staff and org-level operators or reviewers decide a campaign's requests."


def absolute_link(request: Request, created: users.CreatedUser) -> str | None:
    return request.build_absolute_uri(created.password_link) if created.password_link else None


class UserListCreateApi(generics.ListAPIView[Any]):
    """Staff only: every account (``?search=``, ``?is_active=``); POST creates one."""

    serializer_class = UserOutputSerializer
    permission_classes = default_permissions_and(IsStaff)
    filterset_class = UserFilter

    def get_queryset(self) -> Any:
        return selectors.users_all()

    @extend_schema(request=UserInputSerializer, responses={201: UserCreatedSerializer})
    def post(self, request: Request) -> Response:
        data = UserInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        created = users.user_onboard(
            actor=request.user,
            username=data.validated_data["username"],
            email=data.validated_data["email"],
            password=data.validated_data.get("password") or None,
            via=request_via(request),
        )
        body = UserOutputSerializer(created.user).data
        body["password_link"] = absolute_link(request, created)
        response = Response(body, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"  # the link is a credential
        return response


def account_or_404(username: str) -> Any:
    return get_object_or_404(selectors.users_all(), username=username)


class UserDetailApi(generics.GenericAPIView[Any]):
    """Staff only: one account; PATCH ``is_active`` deactivates or reactivates it."""

    serializer_class = UserOutputSerializer
    permission_classes = default_permissions_and(IsStaff)

    def get(self, request: Request, username: str) -> Response:
        return Response(UserOutputSerializer(account_or_404(username)).data)

    @extend_schema(request=UserActiveSerializer, responses=UserOutputSerializer)
    def patch(self, request: Request, username: str) -> Response:
        user = account_or_404(username)
        data = UserActiveSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        users.user_set_active(
            actor=request.user,
            user=user,
            is_active=data.validated_data["is_active"],
            via=request_via(request),
        )
        return Response(UserOutputSerializer(account_or_404(username)).data)


class UserPasswordLinkApi(generics.GenericAPIView[Any]):
    """Staff only: a new one-time password-set link for an active account (the first one
    expired or was lost)."""

    serializer_class = PasswordLinkSerializer
    permission_classes = default_permissions_and(IsStaff)

    @extend_schema(request=None, responses={201: PasswordLinkSerializer})
    def post(self, request: Request, username: str) -> Response:
        link = users.user_password_link_issue(
            actor=request.user, user=account_or_404(username), via=request_via(request)
        )
        response = Response(
            {"password_link": request.build_absolute_uri(link)}, status=status.HTTP_201_CREATED
        )
        response["Cache-Control"] = "no-store"
        return response


class OrgRolesSerializer(serializers.Serializer[Any]):
    org_roles = serializers.ListField(
        child=serializers.ChoiceField(choices=OrgRole.choices),
        max_length=len(OrgRole.choices),
        help_text="reviewer: decides promotion requests in every tenant (four eyes still "
        "hold); operator: runs campaigns and sees model health across tenants.",
    )


class UserOrgRolesApi(generics.GenericAPIView[Any]):
    """Staff only: a user's org-level roles, over every tenant; PUT replaces them."""

    serializer_class = OrgRolesSerializer
    permission_classes = default_permissions_and(IsStaff)

    def get(self, request: Request, username: str) -> Response:
        return Response({"org_roles": users.org_roles_of(account_or_404(username))})

    @extend_schema(request=OrgRolesSerializer, responses=OrgRolesSerializer)
    def put(self, request: Request, username: str) -> Response:
        user = account_or_404(username)
        data = OrgRolesSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        roles = users.org_roles_set(
            actor=request.user,
            user=user,
            roles=data.validated_data["org_roles"],
            via=request_via(request),
        )
        return Response({"org_roles": roles})
