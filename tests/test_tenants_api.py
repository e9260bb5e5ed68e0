"""Tenants, members and API tokens through the REST API."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.tenants.models import ApiToken, Membership
from tests.conftest import Actor, make_actor

pytestmark = pytest.mark.django_db


def bearer(secret: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def test_no_credentials_is_401_in_the_error_envelope(tenant):
    response = Client().get("/api/v1/tenants/")
    assert response.status_code == 401
    body = response.json()["error"]
    assert body["code"] == "not_authenticated"
    assert body["message"]


def test_garbage_token_is_401(tenant):
    response = bearer("wb_not-a-real-token").get("/api/v1/tenants/")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Invalid token."


def test_tenant_list_shows_only_the_callers_tenants_with_their_role(admin, outsider):
    body = admin.api("get", "/api/v1/tenants/").json()
    assert [t["slug"] for t in body["results"]] == ["acme"]
    assert body["results"][0]["role"] == "admin"
    assert body["count"] == 1


def test_only_staff_create_tenants(admin, staff):
    refused = admin.api("post", "/api/v1/tenants/", {"slug": "newco", "name": "NewCo"})
    assert refused.status_code == 403
    created = staff.api(
        "post", "/api/v1/tenants/", {"slug": "newco", "name": "NewCo", "domain": "retail"}
    )
    assert created.status_code == 201
    assert created.json()["slug"] == "newco"
    bad = staff.api("post", "/api/v1/tenants/", {"slug": "Not A Slug!", "name": "x"})
    assert bad.status_code == 400
    assert "slug" in bad.json()["error"]["fields"]
    again = staff.api("post", "/api/v1/tenants/", {"slug": "newco", "name": "NewCo"})
    assert again.status_code == 409


def test_token_secret_is_shown_once_and_stored_hashed(admin):
    response = admin.api("post", "/api/v1/tokens/", {"name": "ci"})
    assert response.status_code == 201
    secret = response.json()["token"]
    assert secret.startswith("wb_")
    assert not ApiToken.objects.filter(token_hash=secret).exists()
    assert ApiToken.objects.filter(pk=response.json()["id"]).exists()
    listed = admin.api("get", "/api/v1/tokens/").json()["results"]
    assert all("token" not in t for t in listed)
    assert bearer(secret).get("/api/v1/tenants/").status_code == 200


def test_revoked_token_is_401_at_once(admin):
    created = admin.api("post", "/api/v1/tokens/", {"name": "short-lived"}).json()
    client = bearer(created["token"])
    assert client.get("/api/v1/tenants/").status_code == 200
    assert admin.api("delete", f"/api/v1/tokens/{created['id']}/").status_code == 204
    response = client.get("/api/v1/tenants/")
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]


def test_expired_token_is_401(admin):
    created = admin.api("post", "/api/v1/tokens/", {"name": "soon"}).json()
    ApiToken.objects.filter(pk=created["id"]).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    response = bearer(created["token"]).get("/api/v1/tenants/")
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]


def test_expiry_in_the_past_is_refused(admin):
    past = (timezone.now() - timedelta(days=1)).isoformat()
    response = admin.api("post", "/api/v1/tokens/", {"name": "x", "expires_at": past})
    assert response.status_code == 400
    assert "expires_at" in response.json()["error"]["fields"]


def test_tenant_limited_token_cannot_reach_other_tenants(admin, other_tenant):
    Membership.objects.create(tenant=other_tenant, user=admin.user, role="admin")
    created = admin.api("post", "/api/v1/tokens/", {"name": "acme-only", "tenant": "acme"}).json()
    client = bearer(created["token"])
    assert [t["slug"] for t in client.get("/api/v1/tenants/").json()["results"]] == ["acme"]
    assert client.get("/api/v1/tenants/acme/datasets/").status_code == 200
    assert client.get("/api/v1/tenants/globex/datasets/").status_code == 404


def test_token_cannot_be_limited_to_a_tenant_the_user_is_not_in(admin, other_tenant):
    response = admin.api("post", "/api/v1/tokens/", {"name": "x", "tenant": "globex"})
    missing = admin.api("post", "/api/v1/tokens/", {"name": "x", "tenant": "no-such-tenant"})
    assert response.status_code == missing.status_code == 400
    # Same words for "exists but not yours" and "does not exist": nothing leaks.
    assert response.json()["error"]["fields"]["tenant"] == [
        m.replace("no-such-tenant", "globex") for m in missing.json()["error"]["fields"]["tenant"]
    ]


def test_other_users_tokens_are_invisible(admin, scientist):
    theirs = scientist.api("post", "/api/v1/tokens/", {"name": "mine"}).json()
    assert admin.api("get", f"/api/v1/tokens/{theirs['id']}/").status_code == 404
    assert admin.api("delete", f"/api/v1/tokens/{theirs['id']}/").status_code == 404
    assert ApiToken.objects.get(pk=theirs["id"]).revoked_at is None


def test_admin_manages_members_and_each_change_is_audited(admin, tenant, db):
    newcomer = make_actor("nina", None, None)
    added = admin.api(
        "post", "/api/v1/tenants/acme/members/", {"username": "nina", "role": "viewer"}
    )
    assert added.status_code == 201
    assert newcomer.api("get", "/api/v1/tenants/acme/datasets/").status_code == 200
    changed = admin.api("patch", "/api/v1/tenants/acme/members/nina/", {"role": "scientist"})
    assert changed.status_code == 200 and changed.json()["role"] == "scientist"
    assert admin.api("delete", "/api/v1/tenants/acme/members/nina/").status_code == 204
    assert newcomer.api("get", "/api/v1/tenants/acme/datasets/").status_code == 404
    verbs = list(
        AuditEvent.objects.filter(tenant=tenant, object_type="membership")
        .order_by("created_at")
        .values_list("verb", flat=True)
    )
    assert verbs[-3:] == ["member.add", "member.change_role", "member.remove"]
    change = AuditEvent.objects.get(tenant=tenant, verb="member.change_role")
    assert change.before == {"role": "viewer"} and change.after == {"role": "scientist"}
    assert change.actor_name == "ada" and change.via.startswith("token:")


def test_scientist_cannot_manage_members_and_is_told_which_role(scientist, viewer):
    response = scientist.api(
        "post", "/api/v1/tenants/acme/members/", {"username": "vic", "role": "admin"}
    )
    assert response.status_code == 403
    message = response.json()["error"]["message"]
    assert "'admin'" in message and "'scientist'" in message
    assert Membership.objects.get(user=viewer.user).role == "viewer"


def test_unknown_user_and_bad_role_are_field_errors(admin):
    response = admin.api(
        "post", "/api/v1/tenants/acme/members/", {"username": "ghost", "role": "owner"}
    )
    assert response.status_code == 400
    assert set(response.json()["error"]["fields"]) == {"username", "role"}


def test_last_admin_cannot_be_removed_or_demoted(admin):
    demote = admin.api("patch", "/api/v1/tenants/acme/members/ada/", {"role": "viewer"})
    remove = admin.api("delete", "/api/v1/tenants/acme/members/ada/")
    assert demote.status_code == remove.status_code == 409
    assert Membership.objects.get(user=admin.user).role == "admin"


def test_removing_a_member_revokes_their_tokens_for_that_tenant(admin, scientist):
    created = scientist.api("post", "/api/v1/tokens/", {"name": "acme", "tenant": "acme"}).json()
    admin.api("delete", "/api/v1/tenants/acme/members/sam/")
    assert bearer(created["token"]).get("/api/v1/tenants/").status_code == 401


def test_create_token_command_prints_a_working_token(admin, capsys):
    call_command("create_token", "ada", "--tenant", "acme", "--expires-days", "7")
    secret = capsys.readouterr().out.strip()
    token = ApiToken.objects.get(prefix=secret[:10])
    assert token.tenant is not None and token.tenant.slug == "acme"
    assert token.expires_at is not None
    assert timedelta(days=6) < token.expires_at - timezone.now() <= timedelta(days=7)
    assert bearer(secret).get("/api/v1/tenants/acme/").status_code == 200


def test_create_token_command_refuses_unknown_user_and_foreign_tenant(admin, other_tenant):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="No user"):
        call_command("create_token", "nobody")
    with pytest.raises(CommandError, match="not a member"):
        call_command("create_token", "ada", "--tenant", "globex")
    assert not ApiToken.objects.filter(user=admin.user, name="cli").exists()


def test_actor_fixture_sanity(admin: Actor):
    # The fixture's token really authenticates as its user.
    assert admin.api("get", "/api/v1/tenants/acme/").json()["role"] == "admin"
