"""The datasets pages in a real Chromium, against a live server.

Signs in through the login form, creates a dataset, uploads banking77 through the upload
form (real multipart, real CSRF cookie and token) and reads the chart the server drew;
then uploads a broken file and reads the inline error. A second run does the same with
JavaScript switched off, since every page must work without it.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import pytest

from apps.tenants import services as tenant_services
from apps.tenants.models import Role
from tests.browser.steps import WIDE, browser_page, sign_in, watch_csp
from tests.conftest import BANKING77, PASSWORD

pytestmark = pytest.mark.browser

TRAIN_CSV = BANKING77 / "train.csv"
BAD_CSV = b"text,category\nhello,greeting\n,farewell\nbye,farewell\n"


@pytest.fixture
def scientist_login(transactional_db: Any) -> str:
    tenant = tenant_services.tenant_create(
        actor=None, slug="acme", name="Acme Corp", domain="banking"
    )
    user = tenant_services.user_create(username="bea", password=PASSWORD)
    tenant_services.membership_add(actor=None, tenant=tenant, user=user, role=Role.SCIENTIST)
    return "bea"


def banking77_rows() -> tuple[int, int]:
    with TRAIN_CSV.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return len(rows), len({row["category"] for row in rows})


def sign_in_and_create_dataset(page: Any, base_url: str, username: str, name: str) -> None:
    sign_in(page, base_url, username)
    assert page.locator("h1").inner_text() == "Datasets"

    page.fill("#id_name", name)
    page.select_option("#id_kind", "training")
    page.fill("#id_domain", "banking")
    page.click("#dataset-create-form button[type=submit]")
    page.wait_for_url(re.compile(r"/t/acme/datasets/[^/]+/$"))
    assert name in page.locator("h1").inner_text()


def upload_bad_file_and_read_the_error(page: Any) -> str:
    page.set_input_files(
        "#id_file", files=[{"name": "broken.csv", "mimeType": "text/csv", "buffer": BAD_CSV}]
    )
    page.fill("#id_label_column", "category")
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-error")
    return str(page.locator("#upload-error").inner_text())


def test_upload_banking77_see_the_chart_then_an_inline_error(
    live_server: Any, chromium: Any, scientist_login: str, artifacts_dir: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    rows, labels = banking77_rows()
    assert (rows, labels) == (10003, 77)
    with browser_page(chromium, viewport=WIDE, timeout_ms=60_000) as page:
        violations = watch_csp(page)
        sign_in_and_create_dataset(page, live_server.url, scientist_login, "banking77")
        assert page.locator("#upload-form").is_visible()

        page.set_input_files("#id_file", str(TRAIN_CSV))
        page.fill("#id_label_column", "category")
        page.click("#upload-form button[type=submit]")
        page.wait_for_url(re.compile(r"\?v=1#main$"))

        expect(page.locator(".message-success")).to_contain_text("Version 1 stored")
        expect(page.locator("#label-chart")).to_be_visible()
        expect(page.locator("#label-chart rect.bar")).to_have_count(labels)
        expect(page.locator("#version-rows")).to_have_attribute("data-rows", str(rows))
        assert page.locator("#version-rows").inner_text().replace(",", "") == str(rows)
        widths = page.locator("#label-chart rect.bar").evaluate_all(
            "bars => bars.map(b => b.getBBox().width)"
        )
        assert all(w > 0 for w in widths) and widths == sorted(widths, reverse=True)
        page.screenshot(path=str(tmp_path / "banking77-chart.png"), full_page=True)

        error = upload_bad_file_and_read_the_error(page)
        assert "line 3" in error and "is empty" in error
        assert page.locator("#id_label_column").input_value() == "category"
        # Still one version: the chart of version 1 is what the page shows.
        expect(page.locator("#version-table tbody tr")).to_have_count(1)
        page.screenshot(path=str(tmp_path / "upload-error.png"), full_page=True)
        # Every page of the flow ran under the Content-Security-Policy without a violation.
        assert violations == []


def test_the_same_flow_works_without_javascript(
    live_server: Any, chromium: Any, scientist_login: str, artifacts_dir: Path
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium, java_script_enabled=False, timeout_ms=60_000) as page:
        sign_in_and_create_dataset(page, live_server.url, scientist_login, "tiny")
        page.set_input_files(
            "#id_file",
            files=[
                {
                    "name": "tiny.csv",
                    "mimeType": "text/csv",
                    "buffer": b"text,category\nhi,greeting\nbye,farewell\nyo,greeting\n",
                }
            ],
        )
        page.fill("#id_label_column", "category")
        page.click("#upload-form button[type=submit]")
        page.wait_for_url(re.compile(r"\?v=1#main$"))
        expect(page.locator("#label-chart rect.bar")).to_have_count(2)
        expect(page.locator("#version-rows")).to_have_attribute("data-rows", "3")

        error = upload_bad_file_and_read_the_error(page)
        assert "line 3" in error

        # The tenant switcher is a <details> element: it opens without script.
        page.click("details.switcher summary")
        expect(page.locator(".switcher-menu a.current")).to_contain_text("Acme Corp")
        page.click("form[action='/logout/'] button")
        page.wait_for_url(re.compile(r"/login/$"))
