"""Onboarding a customer over REST and the staff pages: tenants with their first admins,
staff managing any tenant's members (audited as staff), user accounts with a one-time
password-set link, and deactivation (tokens, sessions, notebook servers)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils.html import escape

from apps.audit.models import AuditEvent
from apps.notebooks.models import NotebookServer, NotebookStatus
from apps.tenants.models import ApiToken, Membership, Role, Tenant
from tests.conftest import PASSWORD, Actor, make_actor
from tests.hub import Hub
from tests.test_notebooks_hub import wait_running

pytestmark = pytest.mark.django_db

STRONG = "plum-orbit-lantern-97"
EVE = {"username": "eve", "email": "eve@example.com"}


def bearer(secret: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def sign_in(client: Client, username: str, password: str) -> bool:
    """Through the login form, as a person would (django-axes counts these)."""
    response = client.post("/login/", {"username": username, "password": password})
    return response.status_code == 302


def signs_in(username: str, password: str) -> bool:
    return sign_in(Client(), username, password)


def signed_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- tenants with their first admins ------------------------------------------------------


def test_staff_creates_a_tenant_whose_first_admin_then_adds_a_member(staff: Actor) -> None:
    first = make_actor("fiona", None, None)
    make_actor("nils", None, None)
    created = staff.api(
        "post",
        "/api/v1/tenants/",
        {"slug": "initech", "name": "Initech", "domain": "retail", "admins": ["fiona"]},
    )
    assert created.status_code == 201, created.content
    assert first.api("get", "/api/v1/tenants/initech/").json()["role"] == "admin"
    added = first.api(
        "post", "/api/v1/tenants/initech/members/", {"username": "nils", "role": "scientist"}
    )
    assert added.status_code == 201, added.content
    tenant = Tenant.objects.get(slug="initech")
    assert AuditEvent.objects.get(verb="tenant.create", tenant=tenant).after["admins"] == ["fiona"]
    first_admin = AuditEvent.objects.get(verb="member.add", tenant=tenant, actor_name="stella")
    assert first_admin.after == {"username": "fiona", "role": "admin", "as_staff": True}
    by_admin = AuditEvent.objects.get(verb="member.add", tenant=tenant, actor_name="fiona")
    assert "as_staff" not in by_admin.after


def test_an_unknown_admin_is_a_400_on_admins_and_creates_nothing(staff: Actor) -> None:
    make_actor("fiona", None, None)
    response = staff.api(
        "post",
        "/api/v1/tenants/",
        {"slug": "initech", "name": "Initech", "admins": ["fiona", "ghost"]},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert list(error["fields"]) == ["admins"]
    assert "'ghost'" in error["fields"]["admins"][0] and "'fiona'" not in error["message"]
    assert not Tenant.objects.filter(slug="initech").exists()
    assert not Membership.objects.filter(user__username="fiona").exists()


def test_a_non_staff_user_cannot_create_a_tenant_with_admins(admin: Actor) -> None:
    response = admin.api(
        "post", "/api/v1/tenants/", {"slug": "mine", "name": "Mine", "admins": ["ada"]}
    )
    assert response.status_code == 403
    assert not Tenant.objects.filter(slug="mine").exists()


def test_staff_list_every_tenant_with_all_and_others_only_their_own(
    staff: Actor, admin: Actor, outsider: Actor
) -> None:
    assert staff.api("get", "/api/v1/tenants/").json()["count"] == 0
    every = staff.api("get", "/api/v1/tenants/?all=true&search=AC").json()
    assert [(t["slug"], t["role"]) for t in every["results"]] == [("acme", None)]
    assert staff.api("get", "/api/v1/tenants/?all=true").json()["count"] == 2
    own = outsider.api("get", "/api/v1/tenants/?all=true").json()
    assert [t["slug"] for t in own["results"]] == ["globex"]


# --- staff manage any tenant's members ----------------------------------------------------


def test_staff_manage_the_members_of_a_tenant_they_are_not_in_audited_as_staff(
    staff: Actor, admin: Actor, tenant: Tenant
) -> None:
    make_actor("nina", None, None)
    base = "/api/v1/tenants/acme/members/"
    assert staff.api("get", base).status_code == 200
    added = staff.api("post", base, {"username": "nina", "role": "viewer"})
    assert added.status_code == 201, added.content
    assert staff.api("get", f"{base}nina/").json()["role"] == "viewer"
    changed = staff.api("patch", f"{base}nina/", {"role": "reviewer"})
    assert changed.status_code == 200 and changed.json()["role"] == "reviewer"
    assert staff.api("delete", f"{base}nina/").status_code == 204
    events = AuditEvent.objects.filter(tenant=tenant, actor_name="stella").order_by("created_at")
    assert [e.verb for e in events] == ["member.add", "member.change_role", "member.remove"]
    assert all(e.after is not None and e.after["as_staff"] is True for e in events)
    # Staff are still no members: the rest of the tenant stays closed to them.
    assert not Membership.objects.filter(user=staff.user).exists()
    assert staff.api("get", "/api/v1/tenants/acme/datasets/").status_code == 404
    assert staff.api("get", "/api/v1/tenants/acme/").status_code == 404


def test_a_non_staff_outsider_still_gets_404_on_the_members_routes(
    outsider: Actor, admin: Actor
) -> None:
    base = "/api/v1/tenants/acme/members/"
    for method, path, data in [
        ("get", base, None),
        ("post", base, {"username": "otto", "role": "admin"}),
        ("patch", f"{base}ada/", {"role": "viewer"}),
        ("delete", f"{base}ada/", None),
    ]:
        response = outsider.api(method, path, data)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["message"] == "No such tenant."
    assert not Membership.objects.filter(user=outsider.user, tenant__slug="acme").exists()


def test_a_staff_token_limited_to_another_tenant_does_not_reach_these_members(
    staff: Actor, admin: Actor, other_tenant: Tenant
) -> None:
    Membership.objects.create(tenant=other_tenant, user=staff.user, role="viewer")
    limited = staff.api("post", "/api/v1/tokens/", {"name": "globex", "tenant": "globex"}).json()
    assert bearer(limited["token"]).get("/api/v1/tenants/acme/members/").status_code == 404
    assert bearer(limited["token"]).get("/api/v1/tenants/globex/members/").status_code == 200


def test_staff_manage_members_on_the_dashboard_of_any_tenant(
    staff: Actor, admin: Actor, tenant: Tenant
) -> None:
    make_actor("nina", None, None)
    client = signed_in(staff.user)
    page = client.get("/t/acme/members/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="staff-notice"' in html and 'id="member-add-form"' in html
    assert 'href="/t/acme/datasets/"' not in html  # only the members are theirs to manage
    added = client.post("/t/acme/members/", {"username": "nina", "role": "viewer"}, follow=True)
    assert escape("Added 'nina' as viewer.") in added.content.decode()
    client.post("/t/acme/members/nina/role/", {"role": "scientist"})
    assert Membership.objects.get(user__username="nina").role == "scientist"
    client.post("/t/acme/members/nina/remove/")
    assert not Membership.objects.filter(user__username="nina").exists()
    events = AuditEvent.objects.filter(tenant=tenant, actor_name="stella", via="session")
    assert {e.verb for e in events} == {"member.add", "member.change_role", "member.remove"}
    assert all(e.after is not None and e.after["as_staff"] is True for e in events)
    # The other tenant pages stay closed to a staff user who is no member.
    assert client.get("/t/acme/datasets/").status_code == 404


def test_a_non_staff_outsider_gets_404_on_the_members_page(outsider: Actor, admin: Actor) -> None:
    client = signed_in(outsider.user)
    assert client.get("/t/acme/members/").status_code == 404
    refused = client.post("/t/acme/members/", {"username": "otto", "role": "admin"})
    assert refused.status_code == 404
    assert not Membership.objects.filter(user=outsider.user, tenant__slug="acme").exists()


def test_staff_create_a_tenant_with_its_first_admin_on_the_dashboard(staff: Actor) -> None:
    make_actor("fiona", None, None)
    client = signed_in(staff.user)
    bad = client.post(
        "/staff/tenants/", {"slug": "initech", "name": "Initech", "admins": "fiona, ghost"}
    )
    assert bad.status_code == 400
    assert escape("No active user named 'ghost'.") in bad.content.decode()
    assert not Tenant.objects.filter(slug="initech").exists()
    created = client.post(
        "/staff/tenants/", {"slug": "initech", "name": "Initech", "admins": "fiona"}
    )
    assert created.status_code == 302 and created["Location"] == "/t/initech/members/"
    assert Membership.objects.get(tenant__slug="initech", user__username="fiona").role == "admin"
    listed = client.get("/staff/tenants/?search=init").content.decode()
    assert 'data-tenant="initech"' in listed


# --- user accounts ------------------------------------------------------------------------


def test_users_api_is_for_staff_only(admin: Actor, staff: Actor) -> None:
    assert Client().get("/api/v1/users/").status_code == 401
    for method, path, data in [
        ("get", "/api/v1/users/", None),
        ("post", "/api/v1/users/", {"username": "eve", "email": "eve@example.com"}),
        ("get", "/api/v1/users/stella/", None),
        ("patch", "/api/v1/users/stella/", {"is_active": False}),
        ("post", "/api/v1/users/stella/password-link", None),
    ]:
        response = admin.api(method, path, data)
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "permission_denied"
    staff.user.refresh_from_db()
    assert staff.user.is_active
    assert not signs_in("eve", STRONG)
    assert signed_in(admin.user).get("/staff/users/").status_code == 403
    assert signed_in(admin.user).get("/staff/tenants/").status_code == 403


def test_staff_list_and_find_users(staff: Actor, admin: Actor, scientist: Actor) -> None:
    scientist.user.is_active = False
    scientist.user.save()
    body = staff.api("get", "/api/v1/users/").json()
    assert body["count"] == 3
    assert [u["username"] for u in body["results"]] == ["ada", "sam", "stella"]
    ada = body["results"][0]
    assert ada["memberships"] == [{"tenant": "acme", "role": "admin"}]
    assert ada["has_password"] is True and "password" not in ada
    found = staff.api("get", "/api/v1/users/?search=EXAMPLE.com&is_active=false").json()
    assert [u["username"] for u in found["results"]] == ["sam"]
    assert staff.api("get", "/api/v1/users/sam/").json()["is_active"] is False
    assert staff.api("get", "/api/v1/users/nobody/").status_code == 404
    page = signed_in(staff.user).get("/staff/users/?search=ad").content.decode()
    assert 'data-username="ada"' in page and 'data-username="sam"' not in page


def test_a_user_created_with_a_password_signs_in_with_it(staff: Actor) -> None:
    response = staff.api(
        "post",
        "/api/v1/users/",
        {**EVE, "password": STRONG},
    )
    assert response.status_code == 201, response.content
    assert response.json()["password_link"] is None
    assert "password" not in response.json()
    assert signs_in("eve", STRONG)
    event = AuditEvent.objects.get(verb="user.create", object_id=str(response.json()["id"]))
    assert event.actor_name == "stella" and event.after["password"] == "set"
    assert STRONG not in str(event.after)


def test_a_weak_password_is_a_400_naming_password_and_creates_nobody(staff: Actor) -> None:
    for weak in ["password", "eve12", "correct horse " * 20]:
        response = staff.api(
            "post",
            "/api/v1/users/",
            {**EVE, "password": weak},
        )
        assert response.status_code == 400, weak
        assert list(response.json()["error"]["fields"]) == ["password"], weak
    assert staff.api("get", "/api/v1/users/?search=eve").json()["count"] == 0


def test_a_taken_username_is_refused(staff: Actor, admin: Actor) -> None:
    response = staff.api("post", "/api/v1/users/", {"username": "ada", "email": "x@example.com"})
    assert response.status_code == 409
    assert "already exists" in response.json()["error"]["message"]


def link_path(url: str) -> str:
    match = re.match(r"^http://testserver(/password/set/[^/]+/[^/]+/)$", url)
    assert match, url
    return match.group(1)


def set_password_through(path: str, password: str) -> Client:
    browser = Client()
    opened = browser.get(path)
    # Django's confirm view moves the token from the URL into the session, then redirects.
    assert opened.status_code == 302, opened.content
    form = browser.get(opened["Location"])
    assert b'id="password-set-form"' in form.content
    done = browser.post(opened["Location"], {"new_password1": password, "new_password2": password})
    assert done.status_code == 302 and done["Location"] == "/password/set/done/", done.content
    return browser


def test_the_one_time_link_sets_a_password_and_works_only_once(staff: Actor) -> None:
    response = staff.api("post", "/api/v1/users/", {"username": "eve", "email": "eve@example.com"})
    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["has_password"] is False
    path = link_path(body["password_link"])
    assert not signs_in("eve", STRONG)

    set_password_through(path, STRONG)
    assert signs_in("eve", STRONG)
    again = Client().get(path, follow=True)
    assert b"This link no longer works" in again.content
    assert b"password-set-form" not in again.content
    assert AuditEvent.objects.filter(verb="user.password_set", actor_name="eve").count() == 1


def test_the_link_refuses_a_weak_password(staff: Actor) -> None:
    body = staff.api(
        "post", "/api/v1/users/", {"username": "eve", "email": "eve@example.com"}
    ).json()
    browser = Client()
    opened = browser.get(link_path(body["password_link"]))
    weak = browser.post(opened["Location"], {"new_password1": "eve", "new_password2": "eve"})
    assert weak.status_code == 200 and b"too short" in weak.content
    assert not signs_in("eve", "eve")


def test_a_deactivated_users_link_does_not_work(staff: Actor) -> None:
    body = staff.api(
        "post", "/api/v1/users/", {"username": "eve", "email": "eve@example.com"}
    ).json()
    assert staff.api("patch", "/api/v1/users/eve/", {"is_active": False}).status_code == 200
    opened = Client().get(link_path(body["password_link"]), follow=True)
    assert b"This link no longer works" in opened.content


def test_staff_issue_a_new_link_that_sets_the_password(staff: Actor, admin: Actor) -> None:
    response = staff.api("post", "/api/v1/users/ada/password-link")
    assert response.status_code == 201, response.content
    set_password_through(link_path(response.json()["password_link"]), STRONG)
    assert signs_in("ada", STRONG)
    assert not signs_in("ada", PASSWORD)


def test_staff_create_a_user_on_the_dashboard_and_see_the_link_once(staff: Actor) -> None:
    client = signed_in(staff.user)
    weak = client.post("/staff/users/", {**EVE, "password": "123"})
    assert weak.status_code == 400 and b"too short" in weak.content
    created = client.post("/staff/users/", {"username": "eve", "email": "eve@example.com"})
    assert created.status_code == 200 and created["Cache-Control"] == "no-store"
    link = re.search(r'<code id="password-link">([^<]+)</code>', created.content.decode())
    assert link is not None
    set_password_through(link_path(link.group(1)), STRONG)
    listed = client.get("/staff/users/").content.decode()
    assert 'data-username="eve"' in listed and link.group(1) not in listed


# --- deactivation ---------------------------------------------------------------------------


def test_deactivation_revokes_tokens_ends_sessions_and_reactivation_lets_in_again(
    staff: Actor, scientist: Actor
) -> None:
    extra = scientist.api("post", "/api/v1/tokens/", {"name": "ci"}).json()["token"]
    browser = Client()
    assert sign_in(browser, "sam", PASSWORD)
    assert browser.get("/t/acme/datasets/").status_code == 200
    other = signed_in(staff.user)  # someone else's session survives

    response = staff.api("patch", "/api/v1/users/sam/", {"is_active": False})
    assert response.status_code == 200, response.content
    assert response.json()["is_active"] is False
    for secret in (scientist.token, extra):
        refused = bearer(secret).get("/api/v1/tenants/acme/datasets/")
        assert refused.status_code == 401
    page = browser.get("/t/acme/datasets/")
    assert page.status_code == 302 and page["Location"].startswith("/login/")
    assert Session.objects.count() == 1 and other.get("/staff/users/").status_code == 200
    assert not signs_in("sam", PASSWORD)
    event = AuditEvent.objects.get(verb="user.deactivate")
    assert event.actor_name == "stella" and event.after is not None
    assert event.after["tokens_revoked"] == 2 and event.after["sessions_ended"] == 1
    assert event.after["as_staff"] is True

    again = staff.api("patch", "/api/v1/users/sam/", {"is_active": True})
    assert again.status_code == 200 and again.json()["is_active"] is True
    assert signs_in("sam", PASSWORD)
    assert bearer(extra).get("/api/v1/tenants/acme/datasets/").status_code == 401  # stays revoked


def test_staff_cannot_deactivate_themselves(staff: Actor) -> None:
    response = staff.api("patch", "/api/v1/users/stella/", {"is_active": False})
    assert response.status_code == 409
    assert staff.api("get", "/api/v1/users/stella/").json()["is_active"] is True


def test_deactivation_on_the_dashboard(staff: Actor, scientist: Actor) -> None:
    client = signed_in(staff.user)
    done = client.post("/staff/users/sam/active/", {"is_active": "false"}, follow=True)
    assert b"is deactivated" in done.content
    assert bearer(scientist.token).get("/api/v1/tenants/").status_code == 401
    client.post("/staff/users/sam/active/", {"is_active": "true"})
    assert staff.api("get", "/api/v1/users/sam/").json()["is_active"] is True


def test_notebook_servers_are_stopped_only_after_the_deactivation_commits(
    staff: Actor, scientist: Actor, tenant: Tenant, django_capture_on_commit_callbacks: Any
) -> None:
    server = NotebookServer.objects.create(
        tenant=tenant,
        user=scientist.user,
        hub_user="sam",
        server_name="nb-test",
        status=NotebookStatus.RUNNING,
    )
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = staff.api("patch", "/api/v1/users/sam/", {"is_active": False})
    assert response.status_code == 200
    # JupyterHub is not called inside the transaction: the stop is queued for after it.
    assert len(callbacks) == 1
    server.refresh_from_db()
    assert server.status == NotebookStatus.RUNNING
    event = AuditEvent.objects.get(verb="user.deactivate")
    assert event.after is not None and event.after["notebooks_stopping"] == [server.pk]


@pytest.mark.django_db(transaction=True)
def test_deactivation_stops_the_users_notebook_server_on_a_real_hub(
    hub_settings: Hub, scientist: Actor, staff: Actor
) -> None:
    from workbench.celery import app

    hub = hub_settings
    started = scientist.api("post", "/api/v1/tenants/acme/notebooks/", {})
    assert started.status_code == 202, started.content
    wait_running(scientist, started.json()["id"], hub)
    server = NotebookServer.objects.get(pk=started.json()["id"])
    assert server.server_name in hub.api("GET", "/users/sam")[1]["servers"]

    # The stop task runs in this process as soon as the deactivation commits (eagerly,
    # instead of on a worker: the task and the hub are real, only the broker hop is not).
    app.conf.update(task_always_eager=True)
    try:
        response = staff.api("patch", "/api/v1/users/sam/", {"is_active": False})
    finally:
        app.conf.update(task_always_eager=False)
    assert response.status_code == 200, response.content
    server.refresh_from_db()
    assert server.status == NotebookStatus.STOPPED
    assert server.server_name not in (hub.api("GET", "/users/sam")[1]["servers"] or {})
    assert ApiToken.objects.get(pk=server.token_id).revoked_at is not None
    stop = AuditEvent.objects.get(verb="notebook.stop", object_id=server.pk)
    assert stop.actor_name == "stella" and stop.via == "user.deactivate"


def test_the_user_list_takes_the_same_queries_for_many_users(
    staff: Actor, admin: Actor, tenant: Tenant, django_assert_num_queries: Any
) -> None:
    staff.api("get", "/api/v1/users/")  # the token's last-used time is written once
    # token, count, page, the page's memberships with their tenants
    with django_assert_num_queries(4):
        few = staff.api("get", "/api/v1/users/")
    for i in range(12):
        make_actor(f"member{i}", tenant, Role.VIEWER)
    with django_assert_num_queries(4):
        many = staff.api("get", "/api/v1/users/")
    assert few.json()["count"] == 2 and many.json()["count"] == 14
    client = signed_in(staff.user)
    client.get("/staff/users/")
    # session, user, count, page, memberships, org roles (the nav and the switcher: 1)
    with django_assert_num_queries(7):
        page = client.get("/staff/users/")
    assert page.content.decode().count('data-username="member') == 12


def test_the_stop_is_retried_while_jupyterhub_does_not_answer(
    scientist: Actor, tenant: Tenant, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from apps.core.errors import ServiceUnavailable
    from apps.tenants.tasks import stop_user_notebooks

    settings.JUPYTERHUB_URL = "http://127.0.0.1:1"  # nothing listens there
    settings.JUPYTERHUB_API_TOKEN = "not-used"
    server = NotebookServer.objects.create(
        tenant=tenant,
        user=scientist.user,
        hub_user="sam",
        server_name="nb-test",
        status=NotebookStatus.RUNNING,
    )
    # Run in this process (apply), Celery retries at once instead of 30 s later; on a
    # worker each try is a new delivery. Either way: every retry asks the hub again, and
    # once the tries are spent the task fails loudly rather than calling it stopped.
    result = stop_user_notebooks.apply(args=(scientist.user.pk, None))
    asked = [r for r in caplog.records if r.getMessage() == "jupyterhub unreachable"]
    assert len(asked) == stop_user_notebooks.max_retries + 1
    assert result.state == "FAILURE" and isinstance(result.result, ServiceUnavailable)
    server.refresh_from_db()
    assert server.status == NotebookStatus.RUNNING  # not marked stopped while it may run
