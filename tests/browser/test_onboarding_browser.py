"""Onboarding a customer in a real Chromium, as staff would do it.

A staff user creates an account on the Users page and reads its one-time password link,
creates a tenant with that user as its first admin, and the new admin follows the link in
a browser of their own, chooses a password, signs in and lands in their tenant, where they
manage the members. The link works only once.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from apps.tenants import services as tenant_services
from tests.browser.steps import WIDE, browser_page, sign_in
from tests.conftest import PASSWORD

pytestmark = pytest.mark.browser


def test_staff_onboard_a_customer_whose_admin_signs_in_and_sees_the_tenant(
    live_server: Any, chromium: Any, transactional_db: Any
) -> None:
    from playwright.sync_api import expect

    tenant_services.user_create(username="stella", password=PASSWORD, is_staff=True)
    base = live_server.url
    with browser_page(chromium, viewport=WIDE) as staff:
        sign_in(staff, base, "stella", lands=False)
        staff.click("nav a[href='/staff/users/']")
        staff.wait_for_url(re.compile(r"/staff/users/$"))
        staff.fill("#id_username", "fiona")
        staff.fill("#id_email", "fiona@initech.example")
        staff.click("#user-create-form button[type=submit]")
        expect(staff.locator("h1")).to_contain_text("User “fiona” created")
        link = staff.locator("#password-link").inner_text().strip()
        assert link.startswith(f"{base}/password/set/")

        staff.click("nav a[href='/staff/tenants/']")
        staff.wait_for_url(re.compile(r"/staff/tenants/$"))
        staff.fill("#id_name", "Initech")
        staff.fill("#id_slug", "initech")
        staff.fill("#id_domain", "retail")
        staff.fill("#id_admins", "fiona")
        staff.click("#tenant-create-form button[type=submit]")
        staff.wait_for_url(re.compile(r"/t/initech/members/$"))
        expect(staff.locator("#staff-notice")).to_be_visible()
        row = staff.locator("#member-table tr[data-username='fiona']")
        expect(row).to_contain_text("Admin")

    with browser_page(chromium, viewport=WIDE) as admin:
        admin.goto(link)
        admin.wait_for_url(re.compile(r"/password/set/[^/]+/set-password/$"))
        admin.fill("#id_new_password1", PASSWORD)
        admin.fill("#id_new_password2", PASSWORD)
        admin.click("#password-set-form button[type=submit]")
        admin.wait_for_url(re.compile(r"/password/set/done/$"))
        admin.click("#password-set-done a[href='/login/']")
        sign_in(admin, base, "fiona", lands=False)
        admin.wait_for_url(re.compile(r"/t/initech/datasets/$"))
        expect(admin.locator("details.switcher summary")).to_contain_text("Initech")
        admin.click("nav a[href='/t/initech/members/']")
        admin.wait_for_url(re.compile(r"/t/initech/members/$"))
        expect(admin.locator("#member-add-form")).to_be_visible()
        expect(admin.locator("#staff-notice")).to_have_count(0)
        # The staff pages are not theirs.
        expect(admin.locator("nav a[href='/staff/users/']")).to_have_count(0)

    with browser_page(chromium) as stranger:
        stranger.goto(link)
        expect(stranger.locator("h1")).to_have_text("This link no longer works")
