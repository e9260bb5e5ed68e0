"""The deployments page in a real Chromium, against a live server.

intents v1 served production yesterday and is kept as a standby; v2 replaced it and is
warm. A reviewer signs in, opens Deployments from the navigation, sees v2 live, asks for a
warm-up and sees the confirmation; then rolls back, cancelling the confirmation dialog the
first time. No Celery worker runs: the warm-up and load tasks are sent to the test broker
and nothing consumes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.datasets.models import DatasetVersion
from apps.deployments.models import Deployment
from apps.registry.services import model_version_create
from apps.tenants import services as tenant_services
from apps.tenants.models import Role
from apps.training import services as training
from tests.browser.steps import WIDE, browser_page, open_section, sign_in
from tests.conftest import make_actor
from tests.training_helpers import make_training_version

pytestmark = pytest.mark.browser


@pytest.fixture
def live_v2(transactional_db: Any, artifacts_dir: Path) -> Iterator[Deployment]:
    tenant = tenant_services.tenant_create(
        actor=None, slug="acme", name="Acme Corp", domain="banking"
    )
    scientist = make_actor("sam", tenant, Role.SCIENTIST)
    make_actor("rita", tenant, Role.REVIEWER)
    data = DatasetVersion.objects.get(pk=make_training_version(scientist, name="intents"))
    versions = []
    for _ in range(2):
        run = training.run_launch(actor=scientist.user, tenant=tenant, dataset_version=data,
                                  base_model="tiny-bert", params={},
                                  model_name="intents")  # fmt: skip
        version = model_version_create(
            run=run, artifact_key="models/x/model.tar", sha256="ab" * 32, size_bytes=1,
            memory_bytes=1, predictions_key="models/x/p.jsonl", labels=["a"], metrics={},
        )  # fmt: skip
        versions.append(version)
    now = timezone.now()
    old = Deployment.objects.create(
        tenant=tenant, model_version=versions[0], environment="production",
        artifact_sha256=versions[0].sha256, status="retired", standby=True,
        warm_at=now - timedelta(days=1), retired_at=now - timedelta(hours=1),
    )  # fmt: skip
    yield Deployment.objects.create(
        tenant=tenant, model_version=versions[1], environment="production",
        artifact_sha256=versions[1].sha256, status="warm", replaces=old,
        warm_at=now - timedelta(hours=1), last_warmup_at=now, last_warmup_ms=4.2,
    )  # fmt: skip


def test_reviewer_warms_up_and_rolls_back_from_the_deployments_page(
    live_server: Any, chromium: Any, live_v2: Deployment, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium, viewport=WIDE) as page:
        sign_in(page, live_server.url, "rita")
        open_section(page, "deployments")
        expect(page.locator("h1")).to_have_text("Deployments")

        live = page.locator("#live-table tr[data-model='intents'][data-environment='production']")
        expect(live.locator(".serving")).to_contain_text("v2")
        expect(live.locator(".serving")).to_contain_text("warm")
        expect(live.locator(".last-warmup")).to_contain_text("4.2 ms")
        page.screenshot(path=str(tmp_path / "deployments.png"), full_page=True)

        row = page.locator(f"#deployment-table tr[data-deployment='{live_v2.pk}']")
        row.locator(".warmup-form button").click()
        expect(page.locator(".message-success")).to_contain_text(
            "Warm-up of intents v2 in production requested"
        )
        assert AuditEvent.objects.filter(
            verb="deployment.warmup_requested", object_id=live_v2.pk
        ).exists()

        # Rolling back asks first; cancelling changes nothing.
        questions: list[str] = []
        page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.dismiss()))
        row.locator(".rollback-form button").click()
        assert questions and questions[0].startswith("Roll intents in production back from v2")
        assert Deployment.objects.count() == 2

        page.once("dialog", lambda dialog: dialog.accept())
        row.locator(".rollback-form button").click()
        expect(page.locator(".message-success")).to_contain_text("back to v1")
        rollback = Deployment.objects.get(is_rollback=True)
        expect(page.locator(f"tr[data-deployment='{rollback.pk}']")).to_have_attribute(
            "data-status", "pending"
        )
        # v2 serves until the rollback is warm.
        expect(live.locator(".serving")).to_contain_text("v2")
        expect(live.locator(".latest")).to_contain_text("pending")
        page.screenshot(path=str(tmp_path / "deployments-rollback.png"), full_page=True)

        page.click(f"tr[data-deployment='{rollback.pk}'] a")
        expect(page.locator("#deployment-status")).to_contain_text("pending")
        expect(page.locator("#timeline .step-current")).to_have_attribute("data-status", "pending")
        page.screenshot(path=str(tmp_path / "deployment-detail.png"), full_page=True)
