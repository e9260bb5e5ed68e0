"""The campaign pages: staff start a campaign from the form (the API's checks, the form's
errors), watch its progress and items, and decide its requests in one batch."""

from __future__ import annotations

import pytest
from django.test import Client

from apps.campaigns import services
from apps.campaigns.models import Campaign, CampaignItem, ItemState
from apps.promotions.models import PromotionRequest
from apps.tenants.models import Role
from tests.conftest import make_actor
from tests.training_helpers import make_training_version, placeholder_version

pytestmark = pytest.mark.django_db


def signed_in(actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


def test_only_staff_see_the_campaign_pages(tenant):
    admin = make_actor("ada", tenant, Role.ADMIN)
    assert signed_in(admin).get("/staff/campaigns/").status_code == 403
    assert signed_in(admin).post("/staff/campaigns/", {"model_name": "x"}).status_code == 403
    assert not Campaign.objects.exists()


def test_the_form_starts_a_campaign_and_its_page_shows_each_tenant(
    tenant, artifacts_dir, django_capture_on_commit_callbacks
):
    scientist = make_actor("sam", tenant, Role.SCIENTIST)
    make_training_version(scientist)
    staff = signed_in(make_actor("stella", None, None, is_staff=True))
    page = staff.get("/staff/campaigns/")
    assert page.status_code == 200 and b"New campaign" in page.content

    # A wrong slug: the form answers 400 naming it, and nothing is created.
    form = {"model_name": "intents", "tenants": "acme nope", "recipe": "base",
            "base_model": "tiny-bert", "target": "staging", "trigger": "now",
            "weight": 1}  # fmt: skip
    bad = staff.post("/staff/campaigns/", form)
    assert bad.status_code == 400 and b"No such tenant(s): nope" in bad.content
    assert not Campaign.objects.exists()

    with django_capture_on_commit_callbacks(execute=False):
        response = staff.post("/staff/campaigns/", {
            "name": "refresh", "model_name": "intents", "tenants": "all", "recipe": "base",
            "base_model": "tiny-bert", "epochs": 2, "target": "staging", "trigger": "now",
            "weight": 1,
        })  # fmt: skip
    campaign = Campaign.objects.get()
    assert (
        response.status_code == 302 and response["Location"] == f"/staff/campaigns/{campaign.pk}/"
    )
    assert campaign.recipe["params"]["epochs"] == 2
    services.campaign_advance(campaign_id=campaign.pk)
    detail = staff.get(response["Location"]).content.decode()
    assert 'data-tenant="acme" data-status="training"' in detail
    assert 'data-live-active="true"' in detail  # the progress refreshes while it moves
    partial = staff.get(f"{response['Location']}?partial=progress").content.decode()
    assert partial.startswith('<div id="campaign-live"') and "of 1 items" in partial

    cancelled = staff.post(f"/staff/campaigns/{campaign.pk}/cancel/", follow=True)
    assert b"cancelled." in cancelled.content
    assert Campaign.objects.get().status == "cancelled"


def test_batch_review_approves_the_ticked_and_reports_the_refused(tenant, artifacts_dir):
    scientist = make_actor("sam", tenant, Role.SCIENTIST)
    version = placeholder_version(scientist, tenant, sha256="ab" * 32)
    creator = make_actor("stella", None, None, is_staff=True)
    campaign = services.campaign_create(
        actor=creator.user, name="c", model_name="intents", selection={"tenants": ["acme"]},
        recipe={"last": True}, target="staging",
    )  # fmt: skip
    promotion = PromotionRequest.objects.create(
        tenant=tenant, model_version=version, target="staging", artifact_sha256=version.sha256,
        status="awaiting_approval", requested_by=creator.user,
        gate_results=[{"gate": "regression vs champion", "dataset": "dv_x",
                       "dataset_name": "golden", "metric": "macro_f1", "op": ">=",
                       "threshold": 0.7, "value": 0.8, "passed": True, "champion_value": 0.9}],
    )  # fmt: skip
    CampaignItem.objects.filter(campaign=campaign).update(
        state=ItemState.REVIEW, run=version.run, promotion=promotion
    )
    page = signed_in(creator).get(f"/staff/campaigns/{campaign.pk}/").content.decode()
    assert f'name="promotion" value="{promotion.pk}"' in page and "1 request awaits" in page
    # Within the allowed regression, yet below the champion: flagged, with the delta.
    assert "regressed</span>" in page and "(champion 0.900, Δ -0.100)" in page
    (item,) = creator.api("get", f"/api/v1/campaigns/{campaign.pk}/items/").json()["results"]
    assert item["promotion"]["regressed"] is True and item["promotion"]["passed"] is True
    assert item["promotion"]["gates"][0]["delta"] == -0.1

    # The requester ticks it: refused, by name, and it still awaits a decision.
    refused = signed_in(creator).post(
        f"/staff/campaigns/{campaign.pk}/decide/",
        {"promotion": promotion.pk, "which": "selected", "decision": "approve"}, follow=True,
    )  # fmt: skip
    assert b"acme: You requested this promotion" in refused.content
    assert PromotionRequest.objects.get().status == "awaiting_approval"

    # A staff reviewer of the tenant who neither requested nor trained it: the tenant's
    # review queue names the campaign and lists its requests together...
    rex = make_actor("rex", tenant, Role.REVIEWER, is_staff=True)
    queue = signed_in(rex).get(f"/t/acme/reviews/?status=all&campaign={campaign.pk}")
    assert queue.status_code == 200
    text = queue.content.decode()
    assert f'data-promotion="{promotion.pk}"' in text and "campaign <a" in text
    assert f"/staff/campaigns/{campaign.pk}/" in text  # staff: on to the batch review
    other = signed_in(rex).get("/t/acme/reviews/?status=all&campaign=cmp_other").content
    assert promotion.pk.encode() not in other
    # ... and the batch rejects it.
    decided = signed_in(rex).post(
        f"/staff/campaigns/{campaign.pk}/decide/",
        {"which": "passing", "decision": "reject", "comment": "not now"}, follow=True,
    )  # fmt: skip
    assert b"Rejected 1: acme." in decided.content
    assert PromotionRequest.objects.get().status == "rejected"
    assert 'data-status="rejected"' in decided.content.decode()
