"""The training dashboard: runs list + launch form, run page with charts, cancel, rerun,
compare, and the models pages.

Runs are created through ``services.run_launch`` (or the form) and moved along by the same
services a worker calls (claim, heartbeat, metrics, fail, succeed); no training happens and
no Celery worker runs: the ``db`` fixture's transaction never commits, so the dispatch
task that ``run_launch`` enqueues on commit is never sent.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.template.loader import render_to_string
from django.test import Client
from django.utils.html import escape

from apps.datasets.models import DatasetVersion
from apps.tenants.models import Tenant
from apps.training import services
from apps.training.charts import SeriesData, line_chart, nice_ticks, progress_view
from apps.training.models import RunStatus, TrainingRun
from tests.conftest import Actor
from tests.training_helpers import banking_slice, make_training_version
from worker.base_models import (
    AUTOCOMPLETE_PARAMS,
    EMBEDDING_PARAMS,
    LORA_PARAMS,
    MINILM_L6_LORA,
    default_base_model,
    get,
)
from worker.training.config import TrainConfig

TRAIN_LOSS_STEPS = [10, 20, 30, 40, 50, 60, 70, 80, 90]
EPOCH_END_STEPS = [30, 60, 90]


def login(client: Client, actor: Actor) -> Client:
    client.force_login(actor.user)
    return client


@pytest.fixture
def version_id(scientist: Actor, artifacts_dir: Any) -> str:
    return make_training_version(scientist)


def launch(actor: Actor, version_id: str, **params: Any) -> TrainingRun:
    version = DatasetVersion.objects.select_related("dataset__tenant").get(pk=version_id)
    config = TrainConfig.from_dict({"base_model": "tiny-bert", **params}).to_dict()
    config.pop("base_model")
    return services.run_launch(
        actor=actor.user,
        tenant=version.dataset.tenant,
        dataset_version=version,
        base_model="tiny-bert",
        params=config,
        via="test",
    )


def start(run: TrainingRun, *, progress: dict[str, Any] | None = None) -> TrainingRun:
    """Claim a run as a worker would, with one heartbeat of progress and log lines."""
    services.runs_dispatch()
    claimed = services.run_claim(run_id=run.pk, worker="w")
    assert claimed is not None and claimed.status == RunStatus.RUNNING
    services.run_heartbeat(
        run_id=run.pk,
        attempt=claimed.attempt,
        progress=progress
        or {
            "phase": "training",
            "epoch": 2,
            "epochs": 3,
            "step": 60,
            "total_steps": 90,
            "loss": 1.2345,
            "samples_per_second": 321.5,
            "eta_seconds": 75.0,
        },
        log_lines=["loaded 144 rows", "epoch 1: val_macro_f1=0.4100"],
    )
    return claimed


def record_curves(run: TrainingRun, *, f1: tuple[float, ...] = (0.41, 0.62, 0.70)) -> None:
    points = [
        {"name": "train_loss", "step": s, "epoch": (s - 1) // 30 + 1, "value": 2.0 - s / 100}
        for s in TRAIN_LOSS_STEPS
    ]
    for epoch, (step, value) in enumerate(zip(EPOCH_END_STEPS, f1, strict=True), start=1):
        points += [
            {"name": "val_loss", "step": step, "epoch": epoch, "value": 1.5 - epoch / 10},
            {"name": "val_accuracy", "step": step, "epoch": epoch, "value": value + 0.05},
            {"name": "val_macro_f1", "step": step, "epoch": epoch, "value": value},
            {"name": "epoch", "step": step, "epoch": epoch, "value": float(epoch)},
        ]
    services.run_record_metrics(run_id=run.pk, points=points)


def succeed(run: TrainingRun, *, f1: float = 0.7) -> TrainingRun:
    metrics = {"val_macro_f1": f1, "val_accuracy": f1 + 0.05, "val_loss": 1.2}
    done = services.run_succeed(
        run_id=run.pk,
        attempt=run.attempt,
        metrics=metrics,
        stop_reason="completed",
        stop_detail="completed 3 epochs",
        progress={"phase": "saving", "epoch": 3, "epochs": 3, "step": 90, "total_steps": 90},
        version_fields={
            "artifact_key": f"models/{run.tenant_id}/{run.pk}/model.tar",
            "sha256": "ab" * 32,
            "size_bytes": 2_500_000,
            "memory_bytes": 40_000_000,
            "predictions_key": f"models/{run.tenant_id}/{run.pk}/predictions.jsonl",
            "labels": ["a", "b"],
            "metrics": metrics,
        },
    )
    assert done is not None
    return done


def form_data(version_id: str, **overrides: Any) -> dict[str, Any]:
    data = {
        "dataset_version": version_id,
        "validation_version": "",
        "base_model": "tiny-bert",
        "model_name": "",
        "epochs": "2",
        "learning_rate": "0.0003",
        "batch_size": "8",
        "max_length": "32",
        "seed": "7",
        "patience": "",
        "validation_split": "0.2",
    }
    data.update(overrides)
    return data


def svg(html: str, chart_id: str) -> str:
    found = re.search(rf'<svg id="{chart_id}".*?</svg>', html, re.S)
    assert found is not None, f"no #{chart_id} on the page"
    return found.group(0)


def polylines(chart: str) -> dict[str, int]:
    """data-name -> number of points of each ``polyline.series`` in one chart."""
    lines = re.findall(r'<polyline class="series" data-name="([^"]+)"[^>]*points="([^"]*)"', chart)
    return {name: len(points.split()) for name, points in lines}


def invalid_field(html: str, field: str) -> str:
    """The markup of one form field, which must be marked invalid."""
    found = re.search(
        rf'<div class="field field-invalid[^"]*">\s*<label for="id_{field}">'
        r'.*?(?=<div class="(?:field|span-all))',
        html,
        re.S,
    )
    assert found is not None, f"{field} is not marked invalid"
    return found.group(0)


def role_message(role: str, have: str) -> str:
    return escape(
        f"This action needs the '{role}' role (or higher) in tenant 'acme'; you have '{have}'."
    )


# --- every page, for members only ---------------------------------------------------------


@pytest.mark.parametrize("who", ["viewer", "scientist"])
def test_every_training_page_renders_for_a_member(
    client: Client, request: pytest.FixtureRequest, scientist: Actor, version_id: str, who: str
) -> None:
    first = launch(scientist, version_id)
    second = succeed(start(launch(scientist, version_id, learning_rate=1e-4)))
    actor: Actor = request.getfixturevalue(who)
    login(client, actor)
    pages = {
        "/t/acme/runs/": "run-list-page",
        f"/t/acme/runs/{first.pk}/": "run-detail-page",
        f"/t/acme/runs/{second.pk}/": "run-detail-page",
        f"/t/acme/runs/compare/?runs={first.pk}&runs={second.pk}": "run-compare-page",
        "/t/acme/models/": "model-list-page",
        "/t/acme/models/intents/": "model-detail-page",
    }
    for url, page_id in pages.items():
        response = client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        assert f'id="{page_id}"' in html, url
        # The layout's nav links to both sections of the current tenant.
        assert 'href="/t/acme/runs/"' in html and 'href="/t/acme/models/"' in html


def test_outsider_gets_404_on_every_training_page(
    client: Client, scientist: Actor, outsider: Actor, version_id: str
) -> None:
    run = succeed(start(launch(scientist, version_id)))
    other = launch(scientist, version_id)
    login(client, outsider)
    gets = [
        "/t/acme/runs/",
        f"/t/acme/runs/{run.pk}/",
        f"/t/acme/runs/{run.pk}/?partial=1",
        f"/t/acme/runs/compare/?runs={run.pk}&runs={other.pk}",
        "/t/acme/models/",
        "/t/acme/models/intents/",
        # The outsider's own tenant does not know acme's objects either.
        f"/t/globex/runs/{run.pk}/",
        f"/t/globex/runs/compare/?runs={run.pk}&runs={other.pk}",
        "/t/globex/models/intents/",
    ]
    for url in gets:
        assert client.get(url).status_code == 404, url
    posts = [
        ("/t/acme/runs/", form_data(version_id)),
        (f"/t/acme/runs/{other.pk}/cancel/", {}),
        (f"/t/acme/runs/{run.pk}/rerun/", {}),
        (f"/t/globex/runs/{other.pk}/cancel/", {}),
    ]
    for url, data in posts:
        assert client.post(url, data).status_code == 404, url
    assert TrainingRun.objects.count() == 2
    assert TrainingRun.objects.get(pk=other.pk).status == RunStatus.QUEUED


def test_unknown_run_and_model_are_404(client: Client, viewer: Actor, tenant: Tenant) -> None:
    login(client, viewer)
    assert client.get("/t/acme/runs/run_nope/").status_code == 404
    assert client.get("/t/acme/models/nope/").status_code == 404


# --- launch ----------------------------------------------------------------------------------


def test_viewer_sees_no_launch_form_and_is_refused_with_the_role(
    client: Client, viewer: Actor, scientist: Actor, version_id: str
) -> None:
    run = launch(scientist, version_id)
    login(client, viewer)
    page = client.get("/t/acme/runs/").content.decode()
    assert 'id="run-launch-form"' not in page
    detail = client.get(f"/t/acme/runs/{run.pk}/").content.decode()
    assert 'id="run-cancel-form"' not in detail and 'id="run-rerun-form"' not in detail
    response = client.post("/t/acme/runs/", form_data(version_id))
    assert response.status_code == 403
    assert role_message("scientist", "viewer") in response.content.decode()
    for action in ("cancel", "rerun"):
        refused = client.post(f"/t/acme/runs/{run.pk}/{action}/")
        assert refused.status_code == 403, action
    assert TrainingRun.objects.count() == 1
    assert TrainingRun.objects.get().status == RunStatus.QUEUED


def test_launch_form_offers_training_versions_and_catalogue_with_config_defaults(
    client: Client, scientist: Actor, reviewer: Actor, version_id: str
) -> None:
    golden = make_training_version(reviewer, name="golden-set", kind="golden")
    login(client, scientist)
    html = client.get("/t/acme/runs/").content.decode()
    form = html[html.index('id="run-launch-form"') :]
    assert f'value="{version_id}"' in form and f'value="{golden}"' not in form
    assert '<optgroup label="intents">' in form
    assert 'value="tiny-bert"' in form and 'value="minilm-l6"' in form
    defaults = TrainConfig(base_model="tiny-bert")
    # Epochs and batch size are the chosen base's defaults when left empty.
    assert re.search(r'<input type="number" name="epochs"(?![^>]*value=)', form)
    assert re.search(r'<input type="number" name="batch_size"(?![^>]*value=)', form)
    # So is the max length (the embedding base's is longer than TrainConfig's).
    assert re.search(r'<input type="number" name="max_length"(?![^>]*value=)', form)
    assert str(defaults.max_length) in form  # in its help
    assert 'name="patience"' in form
    # The adapter base is the default where its weights are installed; LoRA fields are
    # offered (the script shows them for adapter bases only).
    assert f'<option value="{default_base_model()}" selected>' in form
    assert 'data-adapter-bases="minilm-l6-lora minilm-l6-embed"' in form
    assert 'name="lora_r"' in form and 'name="lora_target_modules" value="query"' in form


def test_scientist_launches_a_run_from_the_form(
    client: Client, scientist: Actor, version_id: str
) -> None:
    login(client, scientist)
    response = client.post(
        "/t/acme/runs/", form_data(version_id, model_name="support-intents", patience="2")
    )
    assert response.status_code == 302
    run = TrainingRun.objects.get()
    assert response["Location"] == f"/t/acme/runs/{run.pk}/#main"
    assert run.status == RunStatus.QUEUED and run.created_by == scientist.user
    assert run.model_name == "support-intents" and run.base_model == "tiny-bert"
    expected = TrainConfig(
        base_model="tiny-bert",
        epochs=2,
        learning_rate=0.0003,
        batch_size=8,
        max_length=32,
        seed=7,
        patience=2,
        validation_split=0.2,
    ).to_dict()
    # A full classifier base's run records no LoRA keys, nor embedding or autocomplete ones.
    for name in ("base_model", *LORA_PARAMS, *EMBEDDING_PARAMS, *AUTOCOMPLETE_PARAMS):
        expected.pop(name)
    assert run.params == expected  # the full resolved config, as the API records it
    page = client.get(response["Location"]).content.decode()
    assert f"Run {run.pk} queued." in page
    assert 'data-status="queued"' in page and "#1" in page  # first in the tenant's queue


def test_form_left_at_its_defaults_trains_the_adapter_base_with_its_defaults(
    client: Client, scientist: Actor, version_id: str
) -> None:
    login(client, scientist)
    data = form_data(version_id, base_model=MINILM_L6_LORA, epochs="", learning_rate="")
    data["batch_size"] = ""
    response = client.post("/t/acme/runs/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    run = TrainingRun.objects.get()
    assert run.base_model == MINILM_L6_LORA
    defaults = get(MINILM_L6_LORA).defaults()
    # Every parameter resolved and recorded: the base's defaults for the empty fields.
    assert {name: run.params[name] for name in defaults} == defaults
    assert run.params["epochs"] == 5 and run.params["max_length"] == 32


def test_form_lora_fields_shape_an_adapter_run_and_are_ignored_for_a_full_base(
    client: Client, scientist: Actor, version_id: str
) -> None:
    login(client, scientist)
    lora = {"lora_r": "4", "lora_alpha": "8", "lora_dropout": "0", "lora_target_modules":
            ["query", "key", "value"]}  # fmt: skip
    response = client.post(
        "/t/acme/runs/", form_data(version_id, base_model=MINILM_L6_LORA, **lora)
    )
    assert response.status_code == 302
    adapter = TrainingRun.objects.get()
    assert (adapter.params["lora_r"], adapter.params["lora_alpha"]) == (4, 8.0)
    assert adapter.params["lora_dropout"] == 0.0
    assert adapter.params["lora_target_modules"] == ["query", "key", "value"]
    page = client.get(response["Location"]).content.decode()
    assert '<th scope="row">lora_target_modules</th><td><code>query, key, value</code>' in page
    response = client.post("/t/acme/runs/", form_data(version_id, **lora))  # tiny-bert
    assert response.status_code == 302
    full = TrainingRun.objects.exclude(pk=adapter.pk).get()
    assert not set(LORA_PARAMS) & set(full.params)


def test_form_refuses_a_bad_lora_value_inline(
    client: Client, scientist: Actor, version_id: str
) -> None:
    login(client, scientist)
    data = form_data(version_id, base_model=MINILM_L6_LORA, lora_r="0")
    response = client.post("/t/acme/runs/", data)
    assert response.status_code == 400
    assert escape("Must be between 1 and 256.") in invalid_field(
        response.content.decode(), "lora_r"
    )
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", "0", "Must be between 1 and 100."),
        ("learning_rate", "0", "Must be in (0.0, 1.0]."),
        ("validation_split", "0.9", "Must be in (0.0, 0.5]."),
        ("epochs", "many", "Enter a whole number."),
        ("model_name", "Bad Name", "Use lowercase letters"),
    ],
)
def test_bad_parameters_are_shown_inline_and_create_no_run(
    client: Client, scientist: Actor, version_id: str, field: str, value: str, message: str
) -> None:
    login(client, scientist)
    response = client.post("/t/acme/runs/", form_data(version_id, **{field: value}))
    assert response.status_code == 400
    html = response.content.decode()
    block = invalid_field(html, field)
    assert escape(message) in block
    assert f'value="{value}"' in block  # what was typed stays in the form
    assert not TrainingRun.objects.exists()


def test_golden_dataset_version_is_refused_inline(
    client: Client, scientist: Actor, reviewer: Actor, artifacts_dir: Any
) -> None:
    golden = make_training_version(reviewer, name="golden-set", kind="golden")
    login(client, scientist)
    response = client.post("/t/acme/runs/", form_data(golden))
    assert response.status_code == 400
    html = response.content.decode()
    assert "golden sets are for evaluation only" in invalid_field(html, "dataset_version")
    assert not TrainingRun.objects.exists()


def test_golden_validation_version_is_refused_inline(
    client: Client, scientist: Actor, reviewer: Actor, version_id: str
) -> None:
    golden = make_training_version(reviewer, name="golden-set", kind="golden")
    login(client, scientist)
    response = client.post("/t/acme/runs/", form_data(version_id, validation_version=golden))
    assert response.status_code == 400
    html = response.content.decode()
    assert "validate on a training dataset" in invalid_field(html, "validation_version")
    assert not TrainingRun.objects.exists()


def test_dataset_version_of_another_tenant_reads_as_unknown(
    client: Client, scientist: Actor, outsider: Actor, version_id: str
) -> None:
    created = outsider.api(
        "post", "/api/v1/tenants/globex/datasets/", {"name": "theirs", "kind": "training"}
    )
    assert created.status_code == 201, created.content
    upload = outsider.client.post(
        f"/api/v1/tenants/globex/datasets/{created.json()['id']}/versions/",
        {"file": SimpleUploadedFile("theirs.csv", banking_slice())},
    )
    assert upload.status_code == 201, upload.content
    login(client, scientist)
    for field in ("dataset_version", "validation_version"):
        data = form_data(version_id, **{field: upload.json()["id"]})
        response = client.post("/t/acme/runs/", data)
        assert response.status_code == 400, field
        assert "Select a valid choice" in response.content.decode()
    assert not TrainingRun.objects.exists()


# --- the runs list ------------------------------------------------------------------------


def test_runs_list_shows_status_progress_queue_position_and_key_metric(
    client: Client, scientist: Actor, version_id: str
) -> None:
    done = succeed(start(launch(scientist, version_id)), f1=0.8125)
    running = start(launch(scientist, version_id))
    waiting = launch(scientist, version_id)
    login(client, scientist)
    html = client.get("/t/acme/runs/").content.decode()
    rows = dict(re.findall(r'<tr data-run="([^"]+)" data-status="([^"]+)">', html))
    assert rows == {done.pk: "succeeded", running.pk: "running", waiting.pk: "queued"}
    running_row = html[html.index(f'<tr data-run="{running.pk}"') :]
    running_row = running_row[: running_row.index("</tr>")]
    assert '<progress max="100" value="66.7"' in running_row
    assert "epoch 2/3" in running_row and "step 60/90" in running_row
    assert "ETA 1m 15s" in running_row
    waiting_row = html[html.index(f'<tr data-run="{waiting.pk}"') :]
    assert "#1 in queue" in waiting_row[: waiting_row.index("</tr>")]
    assert "0.8125" in html
    assert 'href="/t/acme/models/intents/#v1"' in html


def test_runs_list_filters_by_status_base_model_dataset_and_model(
    client: Client, scientist: Actor, version_id: str
) -> None:
    queued = launch(scientist, version_id)
    running = start(launch(scientist, version_id))
    other_version = make_training_version(scientist, name="other-intents")
    elsewhere = launch(scientist, other_version)
    login(client, scientist)

    def shown(query: str) -> set[str]:
        html = client.get(f"/t/acme/runs/{query}").content.decode()
        return set(re.findall(r'<tr data-run="([^"]+)"', html))

    assert shown("") == {queued.pk, running.pk, elsewhere.pk}
    assert shown("?status=running") == {running.pk}
    assert shown("?status=queued") == {queued.pk, elsewhere.pk}
    dataset_id = DatasetVersion.objects.get(pk=other_version).dataset_id
    assert shown(f"?dataset={dataset_id}") == {elsewhere.pk}
    assert shown("?model=other-intents") == {elsewhere.pk}
    assert shown("?base_model=minilm-l6") == set()
    empty = client.get("/t/acme/runs/?status=failed").content.decode()
    assert "No run matches these filters." in empty
    bad = client.get("/t/acme/runs/?status=bogus")
    assert bad.status_code == 200 and b"Select a valid choice" in bad.content


def test_partial_refresh_returns_only_the_live_table(
    client: Client, scientist: Actor, version_id: str
) -> None:
    run = launch(scientist, version_id)
    login(client, scientist)
    full = client.get("/t/acme/runs/?status=queued").content.decode()
    assert 'data-live-url="?status=queued&amp;partial=1"' in full
    assert "<noscript>" not in full and 'id="runs-refresh"' in full  # no-script: a link
    partial = client.get("/t/acme/runs/?status=queued&partial=1")
    assert partial.status_code == 200 and partial["Cache-Control"] == "no-store"
    html = partial.content.decode().strip()
    assert html.startswith('<div id="run-table-live"') and html.endswith("</div>")
    assert "<html" not in html and "run-launch-form" not in html and "run-filters" not in html
    assert f'<tr data-run="{run.pk}" data-status="queued">' in html
    assert 'data-live-active="true"' in html
    services.run_cancel(actor=scientist.user, run=run)
    finished = client.get("/t/acme/runs/?partial=1").content.decode()
    assert 'data-status="cancelled"' in finished
    assert "data-live-active" not in finished  # nothing left to watch: the poller stops


def test_runs_list_paginates(client: Client, scientist: Actor, version_id: str) -> None:
    for _ in range(27):
        launch(scientist, version_id)
    login(client, scientist)
    first = client.get("/t/acme/runs/").content.decode()
    assert first.count("<tr data-run=") == 25 and "Page 1 of 2 · 27 runs" in first
    assert client.get("/t/acme/runs/?page=2").content.decode().count("<tr data-run=") == 2


def test_runs_list_query_count_does_not_grow_with_rows(
    client: Client, scientist: Actor, version_id: str, django_assert_max_num_queries: Any
) -> None:
    def make_runs() -> None:
        succeed(start(launch(scientist, version_id)))
        start(launch(scientist, version_id))
        launch(scientist, version_id)

    make_runs()
    login(client, scientist)
    # session, user, membership, the switcher's memberships, count, page, queue positions,
    # and the form's and filters' menus (versions, datasets, model names): none per row.
    with django_assert_max_num_queries(10):
        client.get("/t/acme/runs/")
    for _ in range(4):
        make_runs()
    with django_assert_max_num_queries(10):
        response = client.get("/t/acme/runs/")
    assert response.content.decode().count("<tr data-run=") == 15
    with django_assert_max_num_queries(7):  # the poller's request: no menus
        client.get("/t/acme/runs/?partial=1")


# --- one run --------------------------------------------------------------------------------


def test_run_page_draws_loss_and_validation_charts_from_the_metric_points(
    client: Client, scientist: Actor, version_id: str, settings: Any
) -> None:
    settings.MLFLOW_UI_URL = "http://mlflow.example:5000/"
    run = start(launch(scientist, version_id))
    services.run_set_tracking(
        run_id=run.pk,
        attempt=run.attempt,
        mlflow_run_id="0123abcd",
        environment={"workbench_commit": "c0ffee1", "torch": "2.13.0", "device": "cpu"},
    )
    record_curves(run)
    login(client, scientist)
    html = client.get(f"/t/acme/runs/{run.pk}/").content.decode()

    loss = svg(html, "loss-chart")
    assert polylines(loss) == {"train_loss": len(TRAIN_LOSS_STEPS), "val_loss": 3}
    assert loss.count('class="legend-item"') == 2 and "train loss" in loss
    assert ">step</text>" in loss and ">loss</text>" in loss  # axis labels
    val = svg(html, "val-chart")
    assert polylines(val) == {"val_macro_f1": 3, "val_accuracy": 3}
    assert ">epoch</text>" in val and ">1.0</text>" in val  # scores on a fixed 0..1 axis
    # Validation loss sits at the steps its epochs ended on, right where train loss is.
    train_xy = re.search(r'data-name="train_loss"[^>]*points="([^"]*)"', loss)
    val_xy = re.search(r'data-name="val_loss"[^>]*points="([^"]*)"', loss)
    assert train_xy and val_xy
    train_x = [p.split(",")[0] for p in train_xy.group(1).split()]
    val_x = [p.split(",")[0] for p in val_xy.group(1).split()]
    assert val_x == [train_x[2], train_x[5], train_x[8]]  # steps 30, 60, 90

    assert 'id="progress-epoch">2 / 3<' in html and 'id="progress-step">60 / 90<' in html
    assert 'id="progress-loss">1.2345<' in html and 'id="progress-eta">1m 15s<' in html
    assert 'id="progress-phase">training<' in html
    assert "loaded 144 rows\nepoch 1: val_macro_f1=0.4100" in html
    assert "<code>0123abcd</code>" in html
    assert 'href="http://mlflow.example:5000/#/runs/0123abcd"' in html
    assert "c0ffee1" in html and "2.13.0" in html
    sha = DatasetVersion.objects.get(pk=version_id).sha256
    assert sha[:16] in html
    assert 'data-live-active="true"' in html and "<noscript>" in html  # refreshes itself
    partial = client.get(f"/t/acme/runs/{run.pk}/?partial=1").content.decode().strip()
    assert partial.startswith('<div id="run-live"') and 'id="loss-chart"' in partial
    assert "<html" not in partial


def test_run_without_metrics_says_so_instead_of_an_empty_chart(
    client: Client, scientist: Actor, version_id: str
) -> None:
    run = launch(scientist, version_id)
    login(client, scientist)
    html = client.get(f"/t/acme/runs/{run.pk}/").content.decode()
    assert 'id="loss-chart-empty"' in html and 'id="val-chart-empty"' in html
    assert "<polyline" not in html
    assert 'id="run-queue-position">#1<' in html


def test_finished_run_shows_outcome_parameters_and_its_model_version(
    client: Client, scientist: Actor, version_id: str
) -> None:
    run = start(launch(scientist, version_id, epochs=3, learning_rate=2e-5))
    record_curves(run)
    done = succeed(run)
    login(client, scientist)
    html = client.get(f"/t/acme/runs/{done.pk}/").content.decode()
    assert 'id="run-stop-reason">completed<' in html
    assert "completed 3 epochs" in html
    params = html[html.index('id="run-params"') :]
    assert '<th scope="row">learning_rate</th><td><code>2e-05</code>' in params
    assert '<th scope="row">epochs</th><td><code>3</code>' in params
    assert 'href="/t/acme/models/intents/#v1"' in html and "intents v1" in html
    assert ("ab" * 8) in html and "2.4\xa0MB" in html and "38.1\xa0MB" in html
    assert "data-live-active" not in html and "<noscript>" not in html
    assert 'id="run-cancel-form"' not in html and 'id="run-rerun-form"' in html


def test_failed_run_shows_its_error(client: Client, scientist: Actor, version_id: str) -> None:
    run = start(launch(scientist, version_id))
    services.run_fail(run_id=run.pk, attempt=run.attempt, error="RuntimeError: <CUDA> oom")
    login(client, scientist)
    html = client.get(f"/t/acme/runs/{run.pk}/").content.decode()
    assert 'data-status="failed"' in html
    assert 'id="run-stop-reason">error<' in html
    assert '<pre class="log log-error" id="run-error">RuntimeError: &lt;CUDA&gt; oom</pre>' in html


def test_cancel_a_queued_run_then_a_second_cancel_shows_the_conflict(
    client: Client, scientist: Actor, version_id: str
) -> None:
    run = launch(scientist, version_id)
    login(client, scientist)
    page = client.get(f"/t/acme/runs/{run.pk}/").content.decode()
    assert f'action="/t/acme/runs/{run.pk}/cancel/"' in page
    response = client.post(f"/t/acme/runs/{run.pk}/cancel/")
    assert response.status_code == 302 and response["Location"] == f"/t/acme/runs/{run.pk}/"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED and run.stop_reason == "cancelled"
    after = client.get(response["Location"]).content.decode()
    assert f"Run {run.pk} cancelled." in after and 'data-status="cancelled"' in after
    assert 'id="run-cancel-form"' not in after

    again = client.post(f"/t/acme/runs/{run.pk}/cancel/", follow=True)
    assert again.status_code == 200
    html = again.content.decode()
    assert 'class="message message-error"' in html
    assert "The run is already cancelled; only queued or running runs can be cancelled." in html


def test_cancel_a_running_run_asks_it_to_stop(
    client: Client, scientist: Actor, version_id: str
) -> None:
    run = start(launch(scientist, version_id))
    login(client, scientist)
    html = client.post(f"/t/acme/runs/{run.pk}/cancel/", follow=True).content.decode()
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.cancel_requested
    assert "was asked to stop" in html and "Stopping…" in html
    assert 'id="run-cancel-form"' not in html


def test_rerun_launches_the_same_config_and_opens_it(
    client: Client, scientist: Actor, version_id: str
) -> None:
    run = launch(scientist, version_id, epochs=4, seed=11)
    login(client, scientist)
    response = client.post(f"/t/acme/runs/{run.pk}/rerun/")
    again = TrainingRun.objects.exclude(pk=run.pk).get()
    assert response.status_code == 302 and response["Location"] == f"/t/acme/runs/{again.pk}/"
    assert again.params == run.params and again.rerun_of_id == run.pk
    assert again.status == RunStatus.QUEUED
    html = client.get(response["Location"]).content.decode()
    assert f'href="/t/acme/runs/{run.pk}/"' in html  # "rerun of" links back


def test_cancel_and_rerun_need_a_post(client: Client, scientist: Actor, version_id: str) -> None:
    run = launch(scientist, version_id)
    login(client, scientist)
    assert client.get(f"/t/acme/runs/{run.pk}/cancel/").status_code == 405
    assert client.get(f"/t/acme/runs/{run.pk}/rerun/").status_code == 405


# --- compare --------------------------------------------------------------------------------


def test_compare_overlays_two_runs_and_highlights_what_differs(
    client: Client, scientist: Actor, version_id: str
) -> None:
    slow = start(launch(scientist, version_id, learning_rate=1e-5))
    record_curves(slow, f1=(0.30, 0.40, 0.50))
    slow = succeed(slow, f1=0.5)
    fast = start(launch(scientist, version_id, learning_rate=1e-3))
    record_curves(fast, f1=(0.50, 0.70, 0.80))  # still running: its latest values count
    login(client, scientist)
    response = client.get(f"/t/acme/runs/compare/?runs={slow.pk}&runs={fast.pk}")
    assert response.status_code == 200
    html = response.content.decode()

    start_at = html.index('id="compare-legend"')
    legend = html[start_at : html.index("</ul>", start_at)]
    assert slow.pk in legend and fast.pk in legend
    f1 = svg(html, "compare-f1-chart")
    assert polylines(f1) == {slow.pk: 3, fast.pk: 3}
    assert f1.count('class="legend-item"') == 2
    loss = svg(html, "compare-loss-chart")
    assert polylines(loss) == {slow.pk: len(TRAIN_LOSS_STEPS), fast.pk: len(TRAIN_LOSS_STEPS)}
    colours = re.findall(r'<polyline class="series"[^>]*stroke="([^"]+)"', f1)
    assert len(set(colours)) == 2  # one colour per run

    params = html[html.index('id="compare-params"') :]
    assert '<tr data-param="learning_rate" class="differs">' in params
    assert '<tr data-param="epochs">' in params  # same value: not highlighted
    metrics = html[html.index('id="compare-metrics"') :]
    f1_row = re.search(r'<tr data-metric="val_macro_f1">.*?</tr>', metrics, re.S)
    assert f1_row is not None
    cells = re.findall(r'<td class="num( best)?">([^<]+)', f1_row.group(0))
    assert [(best, text.strip()) for best, text in cells] == [("", "0.5"), (" best", "0.8")]


@pytest.mark.parametrize("count", [0, 1, 6])
def test_compare_needs_two_to_five_runs(
    client: Client, scientist: Actor, version_id: str, count: int
) -> None:
    runs = [launch(scientist, version_id) for _ in range(count)]
    login(client, scientist)
    query = "&".join(f"runs={r.pk}" for r in runs)
    response = client.get(f"/t/acme/runs/compare/?{query}")
    assert response.status_code == 400
    html = response.content.decode()
    assert 'id="compare-error"' in html and "Pick 2 to 5 runs to compare" in html
    if count:
        assert f"you picked {count}" in html
    assert "<svg" not in html


def test_the_same_run_twice_counts_once(client: Client, scientist: Actor, version_id: str) -> None:
    run = launch(scientist, version_id)
    login(client, scientist)
    response = client.get(f"/t/acme/runs/compare/?runs={run.pk}&runs={run.pk}")
    assert response.status_code == 400 and b"you picked 1" in response.content


def test_compare_with_an_unknown_or_foreign_run_is_404(
    client: Client, scientist: Actor, outsider: Actor, version_id: str
) -> None:
    mine = launch(scientist, version_id)
    login(client, scientist)
    assert client.get(f"/t/acme/runs/compare/?runs={mine.pk}&runs=run_nope").status_code == 404
    login(client, outsider)
    theirs = client.get(f"/t/globex/runs/compare/?runs={mine.pk}&runs={mine.pk}x")
    assert theirs.status_code == 404


# --- models ---------------------------------------------------------------------------------


def test_models_pages_list_models_and_their_versions(
    client: Client, scientist: Actor, viewer: Actor, version_id: str
) -> None:
    first = succeed(start(launch(scientist, version_id)), f1=0.61)
    second = succeed(start(launch(scientist, version_id)), f1=0.72)
    login(client, viewer)
    listing = client.get("/t/acme/models/").content.decode()
    assert 'href="/t/acme/models/intents/"' in listing
    assert 'href="/t/acme/models/intents/#v2">v2<' in listing
    html = client.get("/t/acme/models/intents/").content.decode()
    rows = re.findall(r'<tr id="v(\d+)">', html)
    assert rows == ["2", "1"]
    assert ("ab" * 6) in html and "2.4\xa0MB" in html and "38.1\xa0MB" in html
    assert "0.7200" in html and "0.6100" in html
    assert (
        f'href="/t/acme/runs/{first.pk}/"' in html and f'href="/t/acme/runs/{second.pk}/"' in html
    )
    assert "intents v1" in html  # the dataset version each was trained on
    assert "<code>acme.intents</code>" in html


def test_models_page_without_models_points_to_runs(client: Client, viewer: Actor) -> None:
    login(client, viewer)
    html = client.get("/t/acme/models/").content.decode()
    assert "No models yet." in html


# --- chart geometry -------------------------------------------------------------------------


def test_ticks_are_round_and_cover_the_data() -> None:
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(0, 90, integer=True) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(1, 1, integer=True) == [0, 1, 2]  # one point still gets an axis
    ticks = nice_ticks(0.312, 2.31)
    assert ticks[0] <= 0.312 and ticks[-1] >= 2.31 and 4 <= len(ticks) <= 8


def test_line_chart_maps_points_into_the_plot_and_escapes_labels() -> None:
    chart = line_chart(
        chart_id="c",
        title="t",
        x_label="step",
        y_label="loss",
        series=[
            SeriesData(name="a", label="<b>run</b>", points=[(0, 1.0), (10, 0.5), (20, 0.0)]),
            SeriesData(name="b", label="empty", points=[]),
        ],
        x_from_zero=True,
    )
    line = chart.series[0]
    xs = [float(p.split(",")[0]) for p in line.points.split()]
    ys = [float(p.split(",")[1]) for p in line.points.split()]
    assert xs[0] == chart.left and xs[-1] == chart.right  # the data spans the x axis
    assert ys == sorted(ys) and ys[-1] == chart.bottom  # loss falls: y grows downwards
    assert chart.series[1].count == 0 and not chart.empty
    html = render_to_string("training/_line_chart.html", {"chart": chart})
    assert "&lt;b&gt;run&lt;/b&gt;" in html and "<b>run" not in html
    assert html.count('<polyline class="series"') == 1 and "empty (no data yet)" in html


def test_progress_is_read_defensively() -> None:
    assert progress_view({}) is None
    view = progress_view({"phase": "training", "step": "x", "total_steps": 0, "eta_seconds": 3})
    assert view is not None and view.step is None and view.percent is None and view.eta == "3s"
    full = progress_view({"step": 150, "total_steps": 100, "eta_seconds": 3725})
    assert full is not None and full.percent == 100.0 and full.eta == "1h 02m"
