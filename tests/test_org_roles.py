"""Org-level roles: staff grant them; an operator runs campaigns and sees model health
without being staff, and an org-level reviewer decides a campaign's requests in tenants
they are no member of — four eyes still hold."""

from __future__ import annotations

import pytest

from apps.audit.models import AuditEvent
from apps.campaigns import services
from apps.campaigns.models import Campaign, CampaignItem, ItemState
from apps.promotions.models import PromotionRequest
from apps.tenants.models import OrgRoleGrant, Role
from tests.conftest import make_actor
from tests.training_helpers import placeholder_version

pytestmark = pytest.mark.django_db
CAMPAIGN = {"model_name": "intents", "tenants": "all",
            "recipe": {"base_model": "tiny-bert", "params": {"epochs": 1}}}  # fmt: skip


def test_staff_grant_and_revoke_org_roles_and_nobody_else_may(tenant):
    staff = make_actor("stella", None, None, is_staff=True)
    olive = make_actor("olive", None, None)
    url = "/api/v1/users/olive/org-roles"
    assert staff.api("get", url).json() == {"org_roles": []}
    granted = staff.api("put", url, {"org_roles": ["reviewer", "operator"]})
    assert granted.status_code == 200 and granted.json() == {"org_roles": ["operator", "reviewer"]}
    bad = staff.api("put", url, {"org_roles": ["emperor"]})
    assert bad.status_code == 400 and "org_roles" in bad.json()["error"]["fields"]
    assert olive.api("put", url, {"org_roles": []}).status_code == 403  # not staff
    assert OrgRoleGrant.objects.filter(user=olive.user).count() == 2  # refused: nothing changed
    assert staff.api("put", url, {"org_roles": ["reviewer"]}).json() == {"org_roles": ["reviewer"]}
    (event,) = AuditEvent.objects.filter(verb="user.org_roles").order_by("-created_at")[:1]
    assert event.before == {"org_roles": ["operator", "reviewer"]}
    assert event.after == {"org_roles": ["reviewer"]}
    assert staff.api("get", "/api/v1/users/nobody/org-roles").status_code == 404


def test_an_operator_runs_campaigns_and_reads_model_health_without_being_staff(
    tenant, django_capture_on_commit_callbacks
):
    staff = make_actor("stella", None, None, is_staff=True)
    operator = make_actor("otto", None, None)
    plain = make_actor("pat", tenant, Role.ADMIN)
    staff.api("put", "/api/v1/users/otto/org-roles", {"org_roles": ["operator"]})
    assert plain.api("post", "/api/v1/campaigns/", CAMPAIGN).status_code == 403
    assert plain.api("get", "/api/v1/model-health/").status_code == 403
    with django_capture_on_commit_callbacks(execute=False):
        created = operator.api("post", "/api/v1/campaigns/", CAMPAIGN)
    assert created.status_code == 201, created.content
    assert operator.api("get", "/api/v1/model-health/").status_code == 200
    assert operator.api("get", "/api/v1/users/").status_code == 403  # accounts stay staff's
    from django.test import Client

    browser = Client()
    browser.force_login(operator.user)
    assert browser.get("/staff/campaigns/").status_code == 200
    assert browser.get("/staff/model-health/").status_code == 200
    assert browser.get("/staff/users/").status_code == 403
    assert Campaign.objects.get().created_by == operator.user


@pytest.mark.parametrize("with_tenant", [True, False])
def test_the_navigation_links_the_cross_tenant_pages_for_org_roles_only(tenant, with_tenant):
    from django.test import Client

    def nav_of(user) -> str:
        browser = Client()
        browser.force_login(user)
        html = browser.get("/tokens/").content.decode()
        return html.split('<nav class="mainnav"', 1)[1].split("</nav>", 1)[0]

    olive = make_actor(
        "olive", tenant if with_tenant else None, Role.VIEWER if with_tenant else None
    )
    plain = nav_of(olive.user)
    assert 'href="/staff/campaigns/"' not in plain and 'href="/staff/model-health/"' not in plain
    OrgRoleGrant.objects.create(user=olive.user, role="reviewer")
    granted = nav_of(olive.user)
    assert 'href="/staff/campaigns/"' in granted and 'href="/staff/model-health/"' in granted
    assert 'href="/staff/users/"' not in granted  # accounts stay staff's


def test_an_org_reviewer_decides_in_a_tenant_they_are_no_member_of(tenant, artifacts_dir):
    scientist = make_actor("sam", tenant, Role.SCIENTIST)
    version = placeholder_version(scientist, tenant, sha256="ab" * 32)
    operator = make_actor("otto", None, None)
    OrgRoleGrant.objects.create(user=operator.user, role="operator")
    campaign = services.campaign_create(
        actor=operator.user, name="c", model_name="intents", selection={"tenants": ["acme"]},
        recipe={"last": True}, target="staging",
    )  # fmt: skip
    promotion = PromotionRequest.objects.create(
        tenant=tenant, model_version=version, target="staging", artifact_sha256=version.sha256,
        status="awaiting_approval", requested_by=operator.user,
    )  # fmt: skip
    CampaignItem.objects.filter(campaign=campaign).update(
        state=ItemState.REVIEW, run=version.run, promotion=promotion
    )
    url = f"/api/v1/campaigns/{campaign.pk}/approve"
    outsider = make_actor("una", None, None)
    assert outsider.api("post", url, {"promotions": "passing"}).status_code == 403
    reviewer = make_actor("rhea", None, None)
    OrgRoleGrant.objects.create(user=reviewer.user, role="reviewer")
    assert reviewer.api("get", f"/api/v1/campaigns/{campaign.pk}/items/").status_code == 200
    assert reviewer.api("post", "/api/v1/campaigns/", CAMPAIGN).status_code == 403  # no operator
    # The operator requested it: four eyes refuse them even with both roles.
    OrgRoleGrant.objects.create(user=operator.user, role="reviewer")
    refused = operator.api("post", url, {"promotions": "passing"}).json()
    assert refused["decided"] == [] and refused["failed"][0]["code"] == "four_eyes"
    decided = reviewer.api("post", url, {"promotions": [promotion.pk], "comment": "ok"}).json()
    assert decided["decided"] == [
        {"promotion": promotion.pk, "tenant": "acme", "status": "deploying"}
    ]
    assert PromotionRequest.objects.get().decided_by == reviewer.user


def test_staff_set_org_roles_on_the_users_page_and_nobody_else_may(tenant):
    from django.test import Client

    staff = make_actor("stella", None, None, is_staff=True)
    olive = make_actor("olive", tenant, Role.VIEWER)
    browser = Client()
    browser.force_login(staff.user)
    page = browser.get("/staff/users/").content.decode()
    assert 'action="/staff/users/olive/org-roles/"' in page
    done = browser.post("/staff/users/olive/org-roles/", {"org_roles": ["operator", "reviewer"]})
    assert done.status_code == 302
    assert sorted(OrgRoleGrant.objects.filter(user=olive.user).values_list("role", flat=True)) == [
        "operator",
        "reviewer",
    ]
    after = browser.get("/staff/users/").content.decode()
    assert "olive&#x27;s org-level roles: operator, reviewer." in after
    row = after.split('data-username="olive"', 1)[1].split("</tr>", 1)[0]
    assert row.count(" checked>") == 2
    # An unknown role changes nothing; unticking every box revokes them all, audited.
    browser.post("/staff/users/olive/org-roles/", {"org_roles": ["emperor"]})
    assert OrgRoleGrant.objects.filter(user=olive.user).count() == 2
    browser.post("/staff/users/olive/org-roles/", {})
    assert not OrgRoleGrant.objects.filter(user=olive.user).exists()
    assert AuditEvent.objects.filter(verb="user.org_roles", via="session").count() == 2
    other = Client()
    other.force_login(olive.user)
    assert (
        other.post("/staff/users/olive/org-roles/", {"org_roles": ["operator"]}).status_code == 403
    )
    assert not OrgRoleGrant.objects.filter(user=olive.user).exists()
