"""The runs pages in a real Chromium, against a live server.

Signs in, launches a run through the form, and lands on its page as "queued". The test
then plays the worker through the same services a worker calls (claim, heartbeat with
progress, metric points) and sees the page follow: the live region refreshes itself, and a
reload draws the charts. Cancel asks the running run to stop; once the "worker" confirms,
the page shows it cancelled. A second run does it without JavaScript. No Celery worker runs:
nothing consumes the dispatch message the launch sends.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.tenants import services as tenant_services
from apps.tenants.models import Role
from apps.training import services
from apps.training.models import RunStatus, TrainingRun
from tests.browser.steps import WIDE, browser_page, open_section, sign_in, watch_csp
from tests.conftest import make_actor
from tests.training_helpers import make_training_version

pytestmark = pytest.mark.browser

TRAIN_LOSS_STEPS = [5, 10, 15, 20, 25, 30]
EPOCH_END_STEPS = [15, 30]


@pytest.fixture
def scientist_with_data(transactional_db: Any, artifacts_dir: Path) -> Iterator[str]:
    tenant = tenant_services.tenant_create(
        actor=None, slug="acme", name="Acme Corp", domain="banking"
    )
    actor = make_actor("bea", tenant, Role.SCIENTIST)
    make_training_version(actor, name="intents")
    yield "bea"


def sign_in_and_launch(
    page: Any, base_url: str, username: str, *, javascript: bool = True
) -> TrainingRun:
    sign_in(page, base_url, username)
    open_section(page, "runs")
    assert page.locator("h1").inner_text() == "Training runs"

    lora, separate = page.locator("[data-lora-fields]"), page.locator("#id_separate_encoders")
    if javascript:
        # The LoRA fields show for adapter bases, separate encoders for the embedding base only.
        page.select_option("#id_base_model", "minilm-l6-lora")
        assert lora.is_visible() and not separate.is_visible()
        page.select_option("#id_base_model", "minilm-l6-embed")
        assert lora.is_visible() and separate.is_visible()
    page.select_option("#id_base_model", "tiny-bert")
    # Without JavaScript nothing hides: every field stays reachable (the server refuses a
    # field its base does not take).
    assert (lora.is_visible(), separate.is_visible()) == (
        (False, False) if javascript else (True, True)
    )
    page.fill("#id_model_name", "browser-intents")
    page.fill("#id_epochs", "2")
    page.fill("#id_batch_size", "8")
    page.click("#run-launch-form button[type=submit]")
    page.wait_for_url(re.compile(r"/t/acme/runs/run_[0-9a-f]+/#main$"))
    run = TrainingRun.objects.get()
    assert page.url.endswith(f"/t/acme/runs/{run.pk}/#main")
    assert run.model_name == "browser-intents" and run.params["epochs"] == 2
    return run


def play_worker(run: TrainingRun) -> TrainingRun:
    claimed = services.run_claim(run_id=run.pk, worker="browser-test")
    assert claimed is not None
    services.run_heartbeat(
        run_id=run.pk,
        attempt=claimed.attempt,
        progress={
            "phase": "training",
            "epoch": 2,
            "epochs": 2,
            "step": 30,
            "total_steps": 36,
            "loss": 0.9,
            "samples_per_second": 250.0,
            "eta_seconds": 4.0,
        },
        log_lines=["epoch 1: val_macro_f1=0.5000", "epoch 2: val_macro_f1=0.6500"],
    )
    points: list[dict[str, Any]] = [
        {"name": "train_loss", "step": s, "epoch": 1 if s <= 15 else 2, "value": 2.0 - s / 20}
        for s in TRAIN_LOSS_STEPS
    ]
    for epoch, step in enumerate(EPOCH_END_STEPS, start=1):
        points += [
            {"name": "val_loss", "step": step, "epoch": epoch, "value": 1.4 - epoch / 10},
            {"name": "val_accuracy", "step": step, "epoch": epoch, "value": 0.5 + epoch / 10},
            {"name": "val_macro_f1", "step": step, "epoch": epoch, "value": 0.35 + epoch * 0.15},
        ]
    services.run_record_metrics(run_id=run.pk, points=points)
    return claimed


def test_launch_watch_the_charts_and_cancel(
    live_server: Any, chromium: Any, scientist_with_data: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium, viewport=WIDE) as page:
        violations = watch_csp(page)
        run = sign_in_and_launch(page, live_server.url, scientist_with_data)
        expect(page.locator("#run-status")).to_have_text("queued")
        expect(page.locator(".message-success")).to_contain_text(f"Run {run.pk} queued.")
        expect(page.locator("#loss-chart-empty")).to_be_visible()

        claimed = play_worker(run)
        # The live region polls while the run is active: "running" shows without a reload.
        expect(page.locator("#run-status")).to_have_text("running", timeout=15_000)
        page.reload()
        expect(page.locator("#loss-chart polyline.series")).to_have_count(2)
        train_loss = page.locator("#loss-chart polyline.series[data-name=train_loss]")
        expect(train_loss).to_have_attribute("data-count", str(len(TRAIN_LOSS_STEPS)))
        expect(page.locator("#val-chart polyline.series")).to_have_count(2)
        f1 = page.locator("#val-chart polyline.series[data-name=val_macro_f1]")
        expect(f1).to_have_attribute("data-count", str(len(EPOCH_END_STEPS)))
        expect(page.locator("#progress-step")).to_have_text("30 / 36")
        expect(page.locator("#run-log-tail")).to_contain_text("epoch 2: val_macro_f1=0.6500")
        # The curves are really drawn: each polyline has a visible extent.
        widths = page.locator("#loss-chart polyline.series").evaluate_all(
            "lines => lines.map(l => l.getBBox().width)"
        )
        assert all(w > 100 for w in widths)
        page.screenshot(path=str(tmp_path / "run-running.png"), full_page=True)

        # Cancel asks for confirmation (a data-confirm form), then the worker is asked to stop.
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#run-cancel-form button[type=submit]")
        expect(page.locator(".message-info")).to_contain_text("was asked to stop")
        beat = services.run_heartbeat(run_id=run.pk, attempt=claimed.attempt)
        assert beat.held and beat.cancel
        services.run_mark_cancelled(run_id=run.pk, attempt=claimed.attempt, progress={})
        expect(page.locator("#run-status")).to_have_text("cancelled", timeout=15_000)
        expect(page.locator("#run-stop-reason")).to_have_text("cancelled")
        expect(page.locator("#run-live")).not_to_have_attribute("data-live-active", "true")
        assert TrainingRun.objects.get(pk=run.pk).status == RunStatus.CANCELLED

        # Back on the list, the run is there with its final status.
        page.click("nav a[href='/t/acme/runs/']")
        row = page.locator(f"#run-table tr[data-run='{run.pk}']")
        expect(row).to_have_attribute("data-status", "cancelled")
        page.screenshot(path=str(tmp_path / "runs-list.png"), full_page=True)
        # Charts, live regions and the confirm dialog all ran under the CSP, unviolated.
        assert violations == []


def test_launch_and_cancel_without_javascript(
    live_server: Any, chromium: Any, scientist_with_data: str
) -> None:
    from playwright.sync_api import expect

    with browser_page(chromium, java_script_enabled=False) as page:
        run = sign_in_and_launch(page, live_server.url, scientist_with_data, javascript=False)
        expect(page.locator("#run-status")).to_have_text("queued")
        page.click("#run-cancel-form button[type=submit]")
        expect(page.locator(".message-success")).to_contain_text(f"Run {run.pk} cancelled.")
        expect(page.locator("#run-status")).to_have_text("cancelled")
        assert TrainingRun.objects.get(pk=run.pk).status == RunStatus.CANCELLED
