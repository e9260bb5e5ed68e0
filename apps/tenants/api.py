from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.tenants import selectors, services
from apps.tenants.auth import request_via
from apps.tenants.models import ApiToken, Membership, Role, Tenant, slug_validator
from apps.tenants.scoping import TenantScopedMixin


class TenantOutputSerializer(serializers.ModelSerializer[Tenant]):
    role = serializers.SerializerMethodField()

    class Meta:
        model = Tenant
        fields = ["id", "slug", "name", "domain", "created_at", "role"]

    def get_role(self, tenant: Tenant) -> str | None:
        roles: dict[str, str] = self.context.get("roles", {})
        return roles.get(tenant.pk)


class TenantInputSerializer(serializers.Serializer[Any]):
    slug = serializers.CharField(max_length=50, validators=[slug_validator])
    name = serializers.CharField(max_length=200)
    domain = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")


class TenantListCreateApi(generics.ListAPIView[Tenant]):
    serializer_class = TenantOutputSerializer

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return Tenant.objects.none()
        token = self.request.auth if isinstance(self.request.auth, ApiToken) else None
        return selectors.tenants_for_user(user=self.request.user, token=token)

    def get_serializer_context(self) -> dict[str, Any]:
        context = dict(super().get_serializer_context())
        user: Any = self.request.user
        context["roles"] = {m.tenant_id: m.role for m in Membership.objects.filter(user=user)}
        return context

    @extend_schema(request=TenantInputSerializer, responses={201: TenantOutputSerializer})
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
    serializer_class = MemberOutputSerializer

    def get_queryset(self) -> Any:
        return selectors.members_of(tenant=self.tenant)

    @extend_schema(request=MemberInputSerializer, responses={201: MemberOutputSerializer})
    def post(self, request: Request, tenant: str) -> Response:
        data = MemberInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.membership_add(
            actor=request.user,
            tenant=self.tenant,
            user=data.validated_data["username"],
            role=Role(data.validated_data["role"]),
            via=request_via(request),
        )
        return Response(MemberOutputSerializer(membership).data, status=status.HTTP_201_CREATED)


class MemberDetailApi(TenantScopedMixin, generics.GenericAPIView[Membership]):
    required_roles = {"PATCH": Role.ADMIN, "DELETE": Role.ADMIN}
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
            via=request_via(request),
        )
        return Response(MemberOutputSerializer(membership).data)

    def delete(self, request: Request, tenant: str, username: str) -> Response:
        services.membership_remove(
            actor=request.user, membership=self.get_object(), via=request_via(request)
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
