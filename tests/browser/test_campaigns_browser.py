"""The campaign pages in a real Chromium: a staff user starts a campaign from the form, and
its page follows it live — the stacked bar and the counts refresh themselves as the
campaign launches its runs — under the Content-Security-Policy, with nothing refused. No
worker runs: the test moves the campaign on through the service a task would call."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from apps.campaigns import services
from apps.campaigns.models import Campaign
from apps.tenants import services as tenant_services
from apps.tenants.models import Role
from tests.browser.steps import WIDE, browser_page, sign_in, watch_csp
from tests.conftest import PASSWORD, make_actor
from tests.training_helpers import make_training_version

pytestmark = pytest.mark.browser


def test_start_a_campaign_and_watch_it_launch(
    live_server: Any, chromium: Any, transactional_db: Any, artifacts_dir: Path
) -> None:
    from playwright.sync_api import expect

    tenant = tenant_services.tenant_create(actor=None, slug="acme", name="Acme", domain="banking")
    tenant_services.tenant_create(actor=None, slug="bare", name="Bare", domain="banking")
    make_training_version(make_actor("sam", tenant, Role.SCIENTIST))
    tenant_services.user_create(username="stella", password=PASSWORD, is_staff=True)
    with browser_page(chromium, viewport=WIDE) as page:
        refused = watch_csp(page)
        sign_in(page, live_server.url, "stella", lands=False)
        page.click("nav a[href='/staff/campaigns/']")
        page.wait_for_url(re.compile(r"/staff/campaigns/$"))
        page.fill("#id_name", "q4 refresh")
        page.fill("#id_model_name", "intents")
        page.select_option("#id_base_model", "tiny-bert")
        page.fill("#id_epochs", "1")
        page.click("#campaign-create-form button[type=submit]")
        page.wait_for_url(re.compile(r"/staff/campaigns/cmp_[0-9a-f]+/$"))
        assert page.locator("h1").inner_text() == "q4 refresh"
        expect(page.locator("#campaign-counts")).to_contain_text("pending 2")

        # The campaign moves on (what its task does): acme trains, bare has no data. The
        # live region redraws itself without a reload.
        campaign = Campaign.objects.get()
        services.campaign_advance(campaign_id=campaign.pk)
        expect(page.locator("#campaign-counts")).to_contain_text("training 1", timeout=15_000)
        expect(page.locator("#campaign-skipped")).to_contain_text("no_data 1")
        expect(page.locator("#campaign-bar rect[data-status=training]")).to_have_count(1)
        page.reload()
        expect(page.locator("tr[data-tenant=bare]")).to_contain_text("No training data")
        expect(page.locator("tr[data-tenant=acme] td").nth(5)).to_contain_text("queued")

        page.click("#campaign-cancel-form button[type=submit]")
        expect(page.locator(".message-success")).to_contain_text("cancelled")
        expect(page.locator("#campaign-status")).to_have_text("cancelled")
        assert refused == []
