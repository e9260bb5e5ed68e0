"""The tenant switcher of a member of many tenants, in a real Chromium: it lists ten and
searches the rest as you type; Enter opens the My tenants page with the same search."""

from __future__ import annotations

import re
from typing import Any

import pytest

from apps.tenants import services as tenant_services
from apps.tenants.models import Membership, Role, Tenant
from tests.browser.steps import WIDE, browser_page, sign_in, watch_csp
from tests.conftest import PASSWORD

pytestmark = pytest.mark.browser


def test_a_member_of_forty_tenants_finds_one_by_typing_in_the_switcher(
    live_server: Any, chromium: Any, transactional_db: Any
) -> None:
    from playwright.sync_api import expect

    user = tenant_services.user_create(username="olga", password=PASSWORD)
    tenants = [Tenant.objects.create(slug=f"shop-{i:02d}", name=f"Shop {i:02d}") for i in range(40)]
    Membership.objects.bulk_create(
        [Membership(tenant=t, user=user, role=Role.VIEWER) for t in tenants]
    )
    base = live_server.url
    with browser_page(chromium, viewport=WIDE) as page:
        refused = watch_csp(page)
        sign_in(page, base, "olga", lands=False)
        page.goto(f"{base}/t/shop-00/audit/")
        page.click("details.switcher summary")
        entries = page.locator("[data-switcher-results] li a")
        expect(entries).to_have_count(10)
        # The search has the focus once the menu opens; typing narrows the list.
        expect(page.locator("#switcher-q")).to_be_focused()
        page.keyboard.type("shop 3")
        expect(entries).to_have_count(10)  # shop-30 .. shop-39
        expect(entries.first).to_contain_text("Shop 30")
        page.fill("#switcher-q", "shop-37")
        expect(entries).to_have_count(1)
        # The entry keeps the section the switcher was opened from.
        expect(entries.first).to_have_attribute("href", "/t/shop-37/audit/")
        page.fill("#switcher-q", "no such shop")
        expect(page.locator("[data-switcher-results] .switcher-empty")).to_be_visible()
        # Enter: the My tenants page, searched the same way.
        page.fill("#switcher-q", "shop 1")
        page.press("#switcher-q", "Enter")
        page.wait_for_url(re.compile(r"/tenants/\?section=audit-page&q=shop\+1$"))
        expect(page.locator("#my-tenant-table tbody tr")).to_have_count(10)
        page.click("#my-tenant-table a:has-text('Shop 12')")
        page.wait_for_url(re.compile(r"/t/shop-12/audit/$"))
        expect(page.locator("details.switcher summary")).to_contain_text("Shop 12")
        assert refused == []
