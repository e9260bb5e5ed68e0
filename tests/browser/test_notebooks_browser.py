"""Notebooks in a real Chromium: single sign-on into a real JupyterHub.

A member signs in to the workbench, asks for data, a reviewer grants it (services), the
member starts a server with the dashboard's button, sees it starting, then running, opens
it: the hub sends the browser through the workbench's OAuth authorize page, which lets the
signed-in user through, and JupyterLab opens with no second password. The stop button
stops it. A user who belongs to no tenant signs in to the workbench fine, but the hub
turns them away with a message that says why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from apps.datasets.models import DatasetVersion
from apps.notebooks import grants, hubconfig, services
from apps.notebooks.models import NotebookServer
from apps.tenants import services as tenant_services
from apps.tenants.models import Role
from tests.browser.steps import WIDE, browser_page, open_section, sign_in
from tests.conftest import make_actor
from tests.hub import Hub
from tests.training_helpers import make_training_version

pytestmark = pytest.mark.browser


@pytest.fixture
def member_with_grant(transactional_db: Any, artifacts_dir: Path, hub_settings: Hub) -> str:
    tenant = tenant_services.tenant_create(actor=None, slug="acme", name="Acme Corp")
    bea = make_actor("bea", tenant, Role.SCIENTIST)
    rex = make_actor("rex", tenant, Role.REVIEWER)
    version = make_training_version(bea, name="intents")
    dataset = DatasetVersion.objects.get(pk=version).dataset
    asked = grants.access_request_create(
        actor=bea.user, tenant=tenant, dataset=dataset, purpose="notebook"
    )
    grants.access_request_grant(actor=rex.user, request=asked)
    # The hub's OAuth client, as `manage.py jupyterhub` registers it.
    services.hub_oauth_client_ensure(
        client_id="jupyterhub",
        client_secret=hub_settings.oauth_secret,
        redirect_uri=f"{hub_settings.url}/hub/oauth_callback",
    )
    assert hubconfig.oauth_callback_url() == f"{hub_settings.url}/hub/oauth_callback"
    return "bea"


def test_start_from_the_dashboard_then_single_sign_on_into_jupyterlab(
    live_server: Any, chromium: Any, member_with_grant: str, hub_settings: Hub, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium, viewport=WIDE) as page:
        sign_in(page, live_server.url, member_with_grant)
        open_section(page, "notebooks")
        expect(page.locator("#notebook-empty")).to_be_visible()
        page.check("#notebook-start-form input[name=datasets]")
        page.click("#notebook-start-form button[type=submit]")
        expect(page.locator(".message-info")).to_contain_text("is starting")
        server = NotebookServer.objects.get()
        row = page.locator(f"tr[data-notebook='{server.pk}']")
        expect(row.locator(".badge")).to_have_text(re.compile("starting|running"))
        # The live region follows the spawn without a reload.
        link = row.locator("a.notebook-link")
        expect(link).to_be_visible(timeout=120_000)
        expect(row.locator(".badge")).to_have_text("running")
        expect(row).to_contain_text("intents v1")
        href = link.get_attribute("href")
        assert href == f"{hub_settings.url}/user/bea/{server.server_name}/"

        # Open it: hub -> workbench authorize (signed in already) -> hub -> JupyterLab.
        page.goto(href)
        page.wait_for_url(re.compile(rf"/user/bea/{server.server_name}/lab"), timeout=120_000)
        expect(page).to_have_title(re.compile("JupyterLab"), timeout=60_000)
        page.screenshot(path=str(tmp_path / "jupyterlab.png"))

        page.goto(f"{live_server.url}/t/acme/notebooks/")
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator(f"tr[data-notebook='{server.pk}'] .notebook-stop-form button").click()
        expect(page.locator(".message-success")).to_contain_text("stopped")
        row = page.locator(f"tr[data-notebook='{server.pk}']")
        expect(row.locator(".badge")).to_have_text("stopped")
        server.refresh_from_db()
        assert server.status == "stopped" and server.token is not None
        assert server.token.revoked_at is not None


def test_a_user_of_no_tenant_is_turned_away_by_the_hub(
    live_server: Any, chromium: Any, member_with_grant: str, hub_settings: Hub
) -> None:
    from playwright.sync_api import expect

    make_actor("nobody", None, None)
    with browser_page(chromium) as page:
        sign_in(page, live_server.url, "nobody", lands=False)  # a member of no tenant
        page.wait_for_load_state()
        response = page.goto(f"{hub_settings.url}/hub/login")
        page.wait_for_url(re.compile(r"/hub/oauth_callback"))
        assert response is not None
        expect(page.locator("body")).to_contain_text("not a member of any tenant")
