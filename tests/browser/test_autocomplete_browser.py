"""An autocomplete deployment's page in a real Chromium, against a live server: a viewer
types a reply into the box and sees the tiny model's suggestion for what was typed, with
its latency; typing on reuses the page's session cache (cached tokens shown); the requests
are debounced (fewer than the keystrokes); Tab takes the suggestion; nothing breaks the
Content-Security-Policy. The data plane answers in-process with the model a replica would
build from the version's artifact (no Ray here: the fleet's path is in
test_autocomplete_fleet.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.deployments.models import Deployment
from apps.tenants import services as tenant_services
from apps.tenants.models import Role
from tests.autocomplete_helpers import (
    PackedCompleter,
    completer_of,
    register_autocomplete,
    reply_version,
)
from tests.browser.steps import WIDE, browser_page, sign_in, watch_csp
from tests.conftest import make_actor

pytestmark = pytest.mark.browser

CONTEXT = "What is my balance?"


class InProcessPlane:
    """Answers complete as the replica does: the artifact loaded by the replica's loader,
    its sessions' caches kept between calls."""

    def __init__(self, packed: PackedCompleter) -> None:
        from worker.serving.autocomplete import completion_request
        from worker.serving.loading import load_model

        self.model: Any = load_model(packed.tar.as_uri(), packed.sha256, device="cpu").classifier
        self.check = completion_request
        self.prefixes: list[str] = []

    def complete(self, kind: str, model_id: str, **request: Any) -> dict[str, Any]:
        self.prefixes.append(request["prefix"])
        return dict(self.model.complete(self.check(request)))


@pytest.fixture
def warm(
    transactional_db: Any, artifacts_dir: Path, autocomplete_packed: PackedCompleter
) -> Iterator[Deployment]:
    tenant = tenant_services.tenant_create(
        actor=None, slug="acme", name="Acme Corp", domain="banking"
    )
    make_actor("vic", tenant, Role.VIEWER)
    version = register_autocomplete(tenant, "replies", autocomplete_packed, reply_version(tenant))
    yield Deployment.objects.create(
        tenant=tenant, model_version=version, environment="production",
        artifact_sha256=version.sha256, status="warm",
    )  # fmt: skip


def test_a_viewer_sees_suggestions_as_they_type(
    live_server: Any,
    chromium: Any,
    warm: Deployment,
    autocomplete_packed: PackedCompleter,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    plane = InProcessPlane(autocomplete_packed)
    monkeypatch.setattr("apps.deployments.fleet.data_plane", lambda: plane)
    completer = completer_of(autocomplete_packed.model_dir)

    def suggested(prefix: str) -> str:
        (completion,) = completer.complete(prefix, CONTEXT, max_tokens=8)
        return str(completion.text)

    with browser_page(chromium, viewport=WIDE) as page:
        violations = watch_csp(page)
        sign_in(page, live_server.url, "vic")
        page.goto(f"{live_server.url}/t/acme/deployments/{warm.pk}/")
        expect(page.locator("#complete h2")).to_have_text("Suggestions as you type")
        page.fill("#complete-context", CONTEXT)
        page.locator("#complete-prefix").press_sequentially("Which acc", delay=40)
        expect(page.locator("#complete-suggestion")).to_have_text(suggested("Which acc"))
        expect(page.locator("#complete-typed")).to_have_text("Which acc")
        expect(page.locator("#complete-meta")).to_contain_text(" ms · ")
        # Debounced: one request per pause, not one per keystroke (9 here).
        assert 1 <= len(plane.prefixes) < len("Which acc"), plane.prefixes
        assert plane.prefixes[-1] == "Which acc"

        # Typing on: the session's cache from the call before is reused.
        page.locator("#complete-prefix").press_sequentially("ount", delay=40)
        expect(page.locator("#complete-suggestion")).to_have_text(suggested("Which account"))
        expect(page.locator("#complete-meta")).to_have_text(re.compile(r"[1-9]\d* cached tokens"))
        page.screenshot(path=str(tmp_path / "autocomplete.png"), full_page=True)

        # Tab takes the suggestion into the reply, and the next one is asked for.
        taken = "Which account" + suggested("Which account")
        page.locator("#complete-prefix").press("Tab")
        expect(page.locator("#complete-prefix")).to_have_value(taken)
        expect(page.locator("#complete-typed")).to_have_text(taken)
        expect(page.locator("#complete-meta")).to_contain_text(" ms · ")
        assert plane.prefixes[-1] == taken
        expect(page.locator("#complete-error")).to_be_hidden()
    assert violations == []
