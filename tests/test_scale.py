"""A workbench that stays fast for people across many tenants (issue 16, part 4): the bulk
seed the page benchmark measures on, a tenant switcher that searches instead of listing
every tenant, the user's own tenants page behind it, and lists whose queries do not grow
with the caller's tenants or the model count."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from apps.audit.models import AuditEvent
from apps.registry.health import model_health
from apps.registry.models import ModelVersion, RegisteredModel, Stage
from apps.tenants.context_processors import SWITCHER_SIZE
from apps.tenants.models import Membership, Role, Tenant
from apps.training.models import RunMetric, TrainingRun
from tests.conftest import Actor, make_actor

pytestmark = pytest.mark.django_db


def _seed(prefix: str = "scale", **counts: int) -> None:
    sizes = {
        "tenants": 12,
        "runs": 60,
        "model_versions": 24,
        "audit_events": 120,
        "metric_points": 300,
        **counts,
    }
    call_command(
        "seed_scale",
        *(f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()),
        f"--prefix={prefix}",
        stdout=open("/dev/null", "w"),  # noqa: SIM115 - closed with the process
    )


def test_the_bulk_seed_builds_what_it_says_and_refuses_to_run_twice() -> None:
    _seed()
    tenants = Tenant.objects.filter(slug__startswith="scale-")
    assert tenants.count() == 12
    assert TrainingRun.objects.filter(tenant__in=tenants).count() == 60
    assert RegisteredModel.objects.filter(tenant__in=tenants).count() == 36  # 3 per tenant
    assert ModelVersion.objects.count() == 24
    assert AuditEvent.objects.filter(tenant__in=tenants).count() == 120
    assert RunMetric.objects.count() == 300
    # The org user is in every tenant; the one-tenant user in one; each tenant has its admin.
    assert Membership.objects.filter(user__username="scale-org").count() == 12
    assert Membership.objects.filter(user__username="scale-one").count() == 1
    assert Membership.objects.filter(user__username="scale-00-admin", role=Role.ADMIN).exists()
    # Each model's newest version is in production; history is spread over the past year.
    assert ModelVersion.objects.filter(stage=Stage.PRODUCTION).count() == 24
    spread = AuditEvent.objects.filter(tenant__in=tenants).dates("created_at", "day")
    assert len(spread) > 30
    with pytest.raises(CommandError, match="exist already"):
        _seed()
    assert Tenant.objects.filter(slug__startswith="scale-").count() == 12  # nothing added
    with pytest.raises(CommandError, match="--runs >= --model-versions"):
        _seed(prefix="other", runs=5, model_versions=10)
    assert not Tenant.objects.filter(slug__startswith="other-").exists()


def test_the_seeded_pages_render_for_the_org_wide_member_and_staff(client: Client) -> None:
    _seed()
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    client.force_login(users.get(username="scale-org"))
    for page in ("datasets", "runs", "models", "models/intents", "reviews", "audit"):
        assert client.get(f"/t/scale-05/{page}/").status_code == 200, page
    health = model_health(kind="classifier")
    assert health.production_versions == 24
    accuracy = next(m for m in health.metrics if m.metric == "accuracy")
    assert accuracy.count == 24 and 0.6 <= accuracy.min <= accuracy.max <= 0.95
    client.force_login(users.get(username="scale-staff"))
    assert client.get("/staff/model-health/").status_code == 200


def _member_of(actor: Actor, count: int) -> list[Tenant]:
    tenants = [Tenant.objects.create(slug=f"t-{i:03d}", name=f"Shop {i:03d}") for i in range(count)]
    Membership.objects.bulk_create(
        [Membership(tenant=t, user=actor.user, role=Role.VIEWER) for t in tenants]
    )
    return tenants


def _switcher_links(html: str) -> list[str]:
    menu = html.split('class="switcher-menu"', 1)[1].split("</details>", 1)[0]
    return re.findall(r'<li>\s*<a href="/t/([^/]+)/', menu)


def test_a_member_of_many_tenants_gets_a_search_not_the_whole_list(
    client: Client, admin: Actor
) -> None:
    _member_of(admin, 25)  # acme + 25 = 26 tenants
    client.force_login(admin.user)
    html = client.get("/t/t-020/audit/").content.decode()
    listed = _switcher_links(html)
    assert len(listed) == SWITCHER_SIZE
    # The current tenant is listed (and marked) although it is not among the first by slug.
    assert listed[0] == "t-020"
    assert '<a href="/t/t-020/audit/" class="current" aria-current="true">' in html
    assert 'placeholder="Find one of 26 tenants…"' in html
    assert 'href="/tenants/?section=audit-page">All 26 tenants' in html


def test_a_member_of_a_few_tenants_sees_them_all_and_no_search(
    client: Client, admin: Actor
) -> None:
    _member_of(admin, 3)
    client.force_login(admin.user)
    html = client.get("/t/acme/runs/").content.decode()
    assert _switcher_links(html) == ["acme", "t-000", "t-001", "t-002"]
    assert "Find one of" not in html
    assert 'href="/t/t-001/runs/"' in html  # switching keeps the section


def test_a_page_makes_as_many_queries_for_a_member_of_twelve_tenants_as_of_four_hundred(
    client: Client, admin: Actor
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def queries_of_a_page() -> int:
        client.force_login(admin.user)
        client.get("/t/t-011/datasets/")
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/t/t-011/datasets/").status_code == 200
        return len(captured.captured_queries)

    _member_of(admin, 12)  # acme and 12: more than the switcher lists
    few = queries_of_a_page()
    Membership.objects.bulk_create(
        [
            Membership(
                tenant=Tenant.objects.create(slug=f"u-{i:03d}"), user=admin.user, role="viewer"
            )
            for i in range(390)
        ]
    )
    assert queries_of_a_page() == few
    # The switcher's share: its first tenants, their count and the current one.
    assert few <= 8


def test_my_tenants_page_searches_my_tenants_only(
    client: Client, admin: Actor, other_tenant: Tenant
) -> None:
    _member_of(admin, 60)
    client.force_login(admin.user)
    first = client.get("/tenants/").content.decode()
    assert "Page 1 of 2 · 61 tenants" in first  # acme + 60, 50 per page
    found = client.get("/tenants/?q=shop 04&section=run-list-page").content.decode()
    rows = re.findall(r'<tr data-tenant="([^"]+)">', found)
    assert rows == [f"t-{i:03d}" for i in range(40, 50)]
    assert 'href="/t/t-041/runs/"' in found  # the section the search came from
    # Another tenant's name never shows, however it is searched for.
    foreign = client.get(f"/tenants/?q={other_tenant.slug}").content.decode()
    assert re.findall(r'<tr data-tenant="([^"]+)">', foreign) == []
    assert other_tenant.name not in foreign
    partial = client.get("/tenants/?q=t-05&partial=1&section=audit-page")
    assert partial["Cache-Control"] == "no-store"
    links = re.findall(r'href="/t/([^/]+)/audit/"', partial.content.decode())
    assert links == [f"t-{i:03d}" for i in range(50, 60)]
    none = client.get("/tenants/?q=nothing-like-it&partial=1").content.decode()
    assert "No tenant of yours matches." in none
    # A section that is one object's page (or no page at all) leads to the datasets.
    odd = client.get("/tenants/?q=t-059&section=run-detail-page").content.decode()
    assert 'href="/t/t-059/datasets/"' in odd


def test_my_tenants_page_needs_a_sign_in(client: Client) -> None:
    response = client.get("/tenants/")
    assert response.status_code == 302 and "/login/" in response["Location"]


@pytest.mark.parametrize("extra", [0, 60])
def test_the_tenant_list_api_names_the_callers_role_in_a_constant_number_of_queries(
    admin: Actor, extra: int, django_assert_num_queries: Any
) -> None:
    _member_of(admin, extra)
    viewer_elsewhere = make_actor("someone", Tenant.objects.get(slug="acme"), Role.VIEWER)
    assert viewer_elsewhere
    # auth (token lookup + last used), count, page (with the caller's role as a subquery)
    with django_assert_num_queries(4):
        body = admin.api("get", "/api/v1/tenants/?page_size=100").json()
    assert body["count"] == extra + 1
    roles = {t["slug"]: t["role"] for t in body["results"]}
    assert roles["acme"] == Role.ADMIN
    assert all(role == Role.VIEWER for slug, role in roles.items() if slug != "acme")


def test_staff_see_every_tenant_with_their_role_only_where_they_are_members(
    staff: Actor, tenant: Tenant, other_tenant: Tenant
) -> None:
    Membership.objects.create(tenant=tenant, user=staff.user, role=Role.REVIEWER)
    body = staff.api("get", "/api/v1/tenants/?all=true").json()
    roles = {t["slug"]: t["role"] for t in body["results"]}
    assert roles == {tenant.slug: Role.REVIEWER, other_tenant.slug: None}


@pytest.fixture
def audit_log(tenant: Tenant) -> list[str]:
    """120 events of acme a second apart, in pairs that share a timestamp (the id breaks
    the tie, as the index does); their ids newest first."""
    from datetime import timedelta

    from django.utils import timezone

    from apps.core.management.commands.seed_scale import explicit_timestamps

    start = timezone.now() - timedelta(hours=1)
    with explicit_timestamps(AuditEvent):
        AuditEvent.objects.bulk_create(
            [
                AuditEvent(
                    tenant=tenant,
                    created_at=start + timedelta(seconds=i // 2),
                    verb="run.create" if i % 2 else "dataset.create",
                    object_type="x",
                    object_id=f"o{i}",
                )
                for i in range(120)
            ]
        )
    newest_first = AuditEvent.objects.filter(tenant=tenant).order_by("-created_at", "-id")
    return list(newest_first.values_list("id", flat=True))


def _walk(actor: Actor, url: str, key: str = "next") -> list[dict[str, Any]]:
    pages = []
    while url:
        body = actor.api("get", url).json()
        pages.append(body)
        url = body[key]
    return pages


def test_the_audit_log_pages_by_position_with_nothing_twice_and_nothing_missed(
    admin: Actor, audit_log: list[str]
) -> None:
    pages = _walk(admin, "/api/v1/tenants/acme/audit/?page_size=50")
    total = len(audit_log)  # the 120 and acme's own (its creation, its members)
    assert total > 120 and [len(p["results"]) for p in pages] == [50, 50, total - 100]
    assert all(p["count"] == total and p["count_exact"] for p in pages)
    seen = [e["id"] for p in pages for e in p["results"]]
    assert seen == audit_log  # newest first, each once
    assert "cursor=" in pages[0]["next"] and pages[0]["previous"] is None
    # Back from the last page: the same pages in reverse, each the same rows.
    back = _walk(admin, pages[-1]["previous"], key="previous")
    assert [[e["id"] for e in p["results"]] for p in back] == [
        [e["id"] for e in p["results"]] for p in pages[-2::-1]
    ]
    # Filters travel in the links; a page number still works within the cap.
    runs = _walk(admin, "/api/v1/tenants/acme/audit/?verb=run.create&page_size=25")
    assert [len(p["results"]) for p in runs] == [25, 25, 10]
    assert all(e["verb"] == "run.create" for p in runs for e in p["results"])
    second = admin.api("get", "/api/v1/tenants/acme/audit/?page=2&page_size=50").json()
    assert [e["id"] for e in second["results"]] == audit_log[50:100]
    assert second["previous"] and second["next"]


def test_the_audit_log_refuses_bad_cursors_and_pages_past_the_cap(
    admin: Actor, audit_log: list[str], monkeypatch: Any
) -> None:
    from apps.core import keyset

    bad = admin.api("get", "/api/v1/tenants/acme/audit/?cursor=bm9wZQ")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
    zero = admin.api("get", "/api/v1/tenants/acme/audit/?page=0")
    assert zero.status_code == 400 and zero.json()["error"]["code"] == "invalid_page"
    monkeypatch.setattr(keyset, "COUNT_CAP", 30)
    capped = admin.api("get", "/api/v1/tenants/acme/audit/?page_size=20").json()
    assert (capped["count"], capped["count_exact"]) == (30, False)
    far = admin.api("get", "/api/v1/tenants/acme/audit/?page=3&page_size=20")
    assert far.status_code == 400 and far.json()["error"]["code"] == "page_beyond_count_cap"
    # Past the cap the cursor still reaches every row.
    pages = _walk(admin, "/api/v1/tenants/acme/audit/?page_size=20")
    assert [e["id"] for p in pages for e in p["results"]] == audit_log


def test_the_audit_log_makes_as_many_queries_for_ten_rows_as_for_a_hundred(
    admin: Actor, audit_log: list[str]
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    counts = []
    for size in (10, 100):
        first = admin.api("get", f"/api/v1/tenants/acme/audit/?page_size={size}").json()
        with CaptureQueriesContext(connection) as captured:
            assert admin.api("get", first["next"]).status_code == 200
        counts.append(len(captured.captured_queries))
    assert counts[0] == counts[1] <= 7


def test_a_member_of_many_tenants_limits_a_token_by_typing_the_slug(
    client: Client, admin: Actor, other_tenant: Tenant
) -> None:
    from apps.tenants.forms import TENANT_MENU_MAX
    from apps.tenants.models import ApiToken

    client.force_login(admin.user)
    few = client.get("/tokens/").content.decode()
    assert '<select name="tenant"' in few and '<option value="acme">acme</option>' in few
    _member_of(admin, TENANT_MENU_MAX)
    many = client.get("/tokens/").content.decode()
    assert '<select name="tenant"' not in many
    assert 'name="tenant" placeholder="a tenant&#x27;s slug (empty: any of yours)"' in many
    created = client.post("/tokens/", {"name": "ci", "tenant": "t-042"})
    assert created.status_code == 200 and 'id="token-secret"' in created.content.decode()
    assert ApiToken.objects.get(user=admin.user, name="ci").tenant.slug == "t-042"
    # Another tenant's slug is refused like one that does not exist; no token is made.
    refused = client.post("/tokens/", {"name": "sneaky", "tenant": other_tenant.slug})
    assert (
        refused.status_code == 400
        and "not one of the available choices" in refused.content.decode()
    )
    assert not ApiToken.objects.filter(name="sneaky").exists()
