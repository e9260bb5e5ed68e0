"""The Content-Security-Policy in a real Chromium: every dashboard page, the API docs
(Swagger UI) and the lockout page work under it and log no violation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from apps.tenants import services as tenant_services
from apps.tenants.models import Role
from tests.browser.steps import LANDING, WIDE, browser_page, sign_in, watch_csp
from tests.conftest import make_actor
from tests.training_helpers import make_training_version

pytestmark = pytest.mark.browser


@pytest.fixture
def admin_with_data(transactional_db: Any, artifacts_dir: Path) -> str:
    tenant = tenant_services.tenant_create(
        actor=None, slug="acme", name="Acme Corp", domain="banking"
    )
    actor = make_actor("ada", tenant, Role.ADMIN)
    make_training_version(actor, name="intents")
    return "ada"


def test_every_dashboard_page_and_the_api_docs_log_no_csp_violation(
    live_server: Any, chromium: Any, admin_with_data: str
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium, viewport=WIDE) as page:
        violations = watch_csp(page)
        sign_in(page, live_server.url, admin_with_data)
        links = page.locator("header a[href^='/']").evaluate_all(
            "links => [...new Set(links.map(a => a.getAttribute('href')))]"
        )
        assert f"{LANDING}" in links and "/api/v1/docs/" in links
        page.click("table a[href^='/t/acme/datasets/ds_']")  # a dataset, with its label chart
        expect(page.locator("#label-chart")).to_be_visible()
        for href in links:
            response = page.goto(f"{live_server.url}{href}")
            assert response is not None and response.status == 200, href
        # Swagger UI ran its start-up script and drew the operations from the schema.
        page.goto(f"{live_server.url}/api/v1/docs/")
        expect(page.locator(".opblock").first).to_be_visible(timeout=30_000)
        assert page.locator(".opblock").count() > 40
        assert violations == []


def test_a_locked_out_sign_in_says_when_to_try_again(
    live_server: Any, chromium: Any, admin_with_data: str
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium) as page:
        violations = watch_csp(page)
        page.goto(f"{live_server.url}/login/")
        for _ in range(5):
            page.fill("#id_username", admin_with_data)
            page.fill("#id_password", "not-the-password")
            page.click("form.stack button[type=submit]")
            page.wait_for_load_state()
        expect(page.locator("h1")).to_have_text("Sign-in locked")
        expect(page.locator("[role=alert]")).to_contain_text("Try again in 15 minutes")
        page.click("text=Back to sign in")
        page.wait_for_url(re.compile(r"/login/$"))
        assert violations == []
