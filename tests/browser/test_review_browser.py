"""The review queue in a real Chromium, against a live server.

A scientist's promotion request has passed its gates (its evaluations are recorded as a
worker would, through the same service the worker's check calls). A reviewer signs in,
opens the review queue, sees the request awaiting approval, clicks Approve, accepts the
confirmation dialog, and the page shows the request approved and on its way to the fleet
(``deploying``). No Celery worker runs: nothing consumes the messages the request sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.datasets.models import DatasetVersion
from apps.evaluation.models import EvalStatus, Evaluation
from apps.promotions import services
from apps.promotions.models import PromotionRequest, PromotionStatus
from apps.registry.models import ModelVersion
from apps.registry.services import model_version_create
from apps.tenants import services as tenant_services
from apps.tenants.models import Role
from apps.training import services as training
from tests.browser.steps import WIDE, browser_page, open_section, sign_in
from tests.conftest import make_actor
from tests.training_helpers import make_training_version

pytestmark = pytest.mark.browser

LABELS = ["card_lost", "balance", "refund"]


@pytest.fixture
def awaiting(transactional_db: Any, artifacts_dir: Path) -> Iterator[PromotionRequest]:
    tenant = tenant_services.tenant_create(
        actor=None, slug="acme", name="Acme Corp", domain="banking"
    )
    scientist = make_actor("sam", tenant, Role.SCIENTIST)
    reviewer = make_actor("rita", tenant, Role.REVIEWER)
    version = DatasetVersion.objects.get(pk=make_training_version(scientist, name="intents"))
    make_training_version(reviewer, name="golden", kind="golden")
    run = training.run_launch(actor=scientist.user, tenant=tenant, dataset_version=version,
                              base_model="tiny-bert", params={},
                              model_name="intents-clf")  # fmt: skip
    candidate: ModelVersion = model_version_create(
        run=run, artifact_key="models/x/model.tar", sha256="cd" * 32, size_bytes=1,
        memory_bytes=1, predictions_key="models/x/p.jsonl", labels=LABELS, metrics={},
    )  # fmt: skip
    promotion = services.promotion_request(
        actor=scientist.user, tenant=tenant, model_version=candidate, target="staging"
    )
    Evaluation.objects.filter(pk__in=promotion.evaluation_ids).update(
        status=EvalStatus.SUCCEEDED,
        metrics={
            "accuracy": 0.9,
            "macro_f1": 0.9,
            "latency_ms_p95": 5.0,
            "labels": LABELS,
            "confusion": [[8, 1, 1], [0, 9, 1], [2, 0, 8]],
        },
    )
    checked = services.promotion_check(promotion_id=promotion.pk)
    assert checked is not None and checked.status == PromotionStatus.AWAITING_APPROVAL
    yield checked


def test_reviewer_approves_from_the_queue(
    live_server: Any, chromium: Any, awaiting: PromotionRequest, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium, viewport=WIDE) as page:
        sign_in(page, live_server.url, "rita")
        open_section(page, "reviews")
        expect(page.locator("h1")).to_have_text("Review queue")
        expect(page.locator("#count-awaiting_approval")).to_have_text("1")

        row = page.locator(f"#review-table tr[data-promotion='{awaiting.pk}']")
        expect(row).to_have_attribute("data-status", "awaiting_approval")
        expect(row).to_contain_text("intents-clf v1")
        expect(row.locator(".gate-tally")).to_contain_text("2 pass")
        page.screenshot(path=str(tmp_path / "review-queue.png"), full_page=True)

        row.locator(".approve-form input[name=comment]").fill("looks good")
        questions: list[str] = []

        def accept(dialog: Any) -> None:
            questions.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        row.locator(".approve-form button[type=submit]").click()
        expect(page.locator(".message-success")).to_contain_text("approved for staging")
        assert questions and questions[0].startswith("Approve intents-clf v1")
        expect(page.locator("#count-deploying")).to_have_text("1")
        expect(page.locator("#count-awaiting_approval")).to_have_text("0")

        # The deploying tab lists it with its new status.
        page.click("a.status-tab[data-status=deploying]")
        approved = page.locator(f"#review-table tr[data-promotion='{awaiting.pk}']")
        expect(approved).to_have_attribute("data-status", "deploying")
        expect(approved.locator(".promotion-status")).to_have_text("deploying")

        promotion = PromotionRequest.objects.get(pk=awaiting.pk)
        assert promotion.status == PromotionStatus.DEPLOYING
        assert promotion.decided_by is not None and promotion.decided_by.username == "rita"
        assert promotion.decision_comment == "looks good"
        assert ModelVersion.objects.get(pk=promotion.model_version_id).stage == "staging"

        # The request's page: gates, the heat map, and the decision.
        approved.locator("a").first.click()
        expect(page.locator("#promotion-status")).to_have_text("deploying")
        expect(page.locator("#decision")).to_contain_text("approved by rita")
        (evaluation_id,) = promotion.evaluation_ids
        expect(page.locator(f"#confusion-{evaluation_id} rect.cell")).to_have_count(9)
        page.screenshot(path=str(tmp_path / "review-detail.png"), full_page=True)


def test_reviewer_cancels_the_confirmation(
    live_server: Any, chromium: Any, awaiting: PromotionRequest
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium) as page:
        sign_in(page, live_server.url, "rita")
        page.goto(f"{live_server.url}/t/acme/reviews/{awaiting.pk}/")
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("#review-detail-page .reject-form button[type=submit]")
        expect(page.locator("#promotion-status")).to_have_text("awaiting_approval")
        assert PromotionRequest.objects.get(pk=awaiting.pk).status == "awaiting_approval"
