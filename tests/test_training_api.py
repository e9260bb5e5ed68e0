"""Launching runs and sweeps through the API: validation, queueing, fairness, cancel."""

from __future__ import annotations

import pytest

from apps.tenants.models import Role
from apps.training import services
from apps.training.models import RunStatus, TrainingRun
from tests.conftest import make_actor
from tests.training_helpers import banking_slice, make_training_version

pytestmark = pytest.mark.django_db
RUNS = "/api/v1/tenants/acme/runs/"


@pytest.fixture
def version_id(scientist, artifacts_dir) -> str:
    return make_training_version(scientist)


def launch(actor, version_id: str, **extra):
    body = {
        "dataset_version": version_id,
        "base_model": "tiny-bert",
        "params": {"epochs": 1, "batch_size": 8},
        **extra,
    }
    return actor.api("post", RUNS, body)


def test_base_model_catalogue_lists_the_classifiers_and_the_embedding_model(scientist):
    body = scientist.api("get", "/api/v1/base-models/").json()
    ids = {m["id"]: m for m in body}
    assert {"tiny-bert", "minilm-l6", "minilm-l6-embed", "tiny-gpt2"} <= set(ids)
    assert all(m["size_bytes"] > 0 for m in body)
    assert {m["id"] for m in body if m["kind"] == "embedding"} == {"minilm-l6-embed"}
    assert {m["kind"] for m in body} == {"classifier", "embedding", "autocomplete"}
    gpt2 = ids["tiny-gpt2"]
    assert (gpt2["kind"], gpt2["format"], gpt2["base"]) == ("autocomplete", "full", None)
    assert gpt2["installed"] is True and gpt2["defaults"]["init_from"] == "scratch"
    embed = ids["minilm-l6-embed"]
    assert (embed["format"], embed["base"]) == ("adapter", "all-MiniLM-L6-v2")
    assert embed["base_sha256"] == ids["minilm-l6-lora"]["base_sha256"]  # one shared base
    assert embed["defaults"]["max_length"] == 128
    assert embed["defaults"]["document_fields"] == "title_text"


def test_catalogue_states_format_base_and_defaults(scientist):
    from worker import base_models

    body = {m["id"]: m for m in scientist.api("get", "/api/v1/base-models/").json()}
    tiny, adapter = body["tiny-bert"], body["minilm-l6-lora"]
    assert (tiny["format"], tiny["base"], tiny["base_sha256"]) == ("full", None, None)
    assert tiny["installed"] is True and tiny["defaults"] == {"learning_rate": 1e-3}
    assert adapter["format"] == "adapter" and adapter["base"] == "all-MiniLM-L6-v2"
    assert adapter["installed"] is True  # the MiniLM package is a dev dependency
    assert adapter["base_sha256"] == base_models.base_sha256("minilm-l6-lora")
    assert len(adapter["base_sha256"]) == 64
    assert adapter["defaults"]["epochs"] == 5
    assert adapter["defaults"]["lora_target_modules"] == ["query", "value"]
    assert [m["id"] for m in body.values() if m["default"]] == ["minilm-l6-lora"]


def test_a_run_naming_no_base_model_trains_the_adapter_base_with_its_defaults(
    scientist, version_id
):
    from worker.base_models import get

    response = scientist.api("post", RUNS, {"dataset_version": version_id, "params": {"seed": 3}})
    assert response.status_code == 202, response.content
    run = response.json()
    assert run["base_model"] == "minilm-l6-lora"
    defaults = get("minilm-l6-lora").defaults()
    assert {name: run["params"][name] for name in defaults} == defaults  # epochs 5, lora_r 8...
    assert run["params"]["seed"] == 3 and run["params"]["max_length"] == 64
    explicit = launch(scientist, version_id, base_model="minilm-l6-lora",
                      params={"epochs": 2, "lora_r": 16}).json()  # fmt: skip
    assert (explicit["params"]["epochs"], explicit["params"]["lora_r"]) == (2, 16)
    assert explicit["params"]["lora_alpha"] == 16.0


def test_a_full_base_records_no_lora_parameters(scientist, version_id):
    run = launch(scientist, version_id).json()
    assert not {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"} & set(run["params"])


@pytest.mark.parametrize(
    ("params", "field"),
    [({"lora_r": 8}, "lora_r"), ({"lora_target_modules": ["query"]}, "lora_target_modules")],
)
def test_lora_parameters_are_refused_for_a_full_base(scientist, version_id, params, field):
    response = launch(scientist, version_id, base_model="tiny-bert", params=params)
    assert response.status_code == 400, response.content
    (message,) = response.json()["error"]["fields"]["params"][field]
    assert "Only adapter base models take LoRA parameters" in message
    assert not TrainingRun.objects.exists()


def test_bad_lora_values_are_refused_for_an_adapter_base(scientist, version_id):
    response = launch(scientist, version_id, base_model="minilm-l6-lora",
                      params={"lora_target_modules": ["mlp"]})  # fmt: skip
    assert response.status_code == 400, response.content
    assert "lora_target_modules" in str(response.json()["error"]["fields"]["params"])
    assert not TrainingRun.objects.exists()


def test_minilm_defaults_to_a_fine_tuning_learning_rate(scientist, version_id):
    run = launch(scientist, version_id, base_model="minilm-l6").json()
    assert run["params"]["learning_rate"] == 5e-5
    explicit = launch(scientist, version_id, params={"learning_rate": 0.01}).json()
    assert explicit["params"]["learning_rate"] == 0.01


def test_launch_returns_202_queued_with_the_resolved_config(
    scientist, version_id, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = launch(scientist, version_id)
    assert response.status_code == 202, response.content
    run = response.json()
    assert run["status"] == "queued"
    assert run["params"]["epochs"] == 1
    assert run["params"]["learning_rate"] == 1e-3  # tiny-bert's default: it trains from scratch
    assert run["params"]["seed"] == 0  # defaults are resolved and recorded
    assert run["model_name"] == "intents"
    assert len(callbacks) == 1  # the dispatch is enqueued after commit, not before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"base_model": "gpt-17"}, "base_model"),
        ({"params": {"epochs": 0}}, "params"),
        ({"params": {"learning_rate": -1}}, "params"),
        ({"params": {"batch_size": 100000}}, "params"),
        ({"params": {"warp_speed": 9}}, "params"),
        ({"dataset_version": "dv_doesnotexist"}, "dataset_version"),
        # PostgreSQL refuses a NUL in a query: it must be refused before the lookup (the
        # fuzzer's 500).
        ({"dataset_version": "dv_\x00"}, "dataset_version"),
        ({"validation_version": "dv_\x00"}, "validation_version"),
    ],
)
def test_bad_launch_input_names_the_field_and_creates_nothing(scientist, version_id, body, field):
    payload = {"dataset_version": version_id, "base_model": "tiny-bert", "params": {}, **body}
    response = scientist.api("post", RUNS, payload)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]
    assert not TrainingRun.objects.exists()


def test_golden_dataset_cannot_be_trained_on(scientist, reviewer, artifacts_dir):
    golden = make_training_version(reviewer, name="golden", kind="golden")
    response = launch(scientist, golden)
    assert response.status_code == 400
    assert "golden" in response.json()["error"]["fields"]["dataset_version"][0]
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize("kind", ["golden", "sample"])
def test_a_golden_or_sample_version_is_refused_as_validation_data(
    kind, scientist, reviewer, version_id
):
    from apps.training.models import Sweep

    held_out = make_training_version(reviewer, name=f"held-out-{kind}", kind=kind)
    response = launch(scientist, version_id, validation_version=held_out)
    assert response.status_code == 400
    (message,) = response.json()["error"]["fields"]["validation_version"]
    assert f"is a {kind} dataset" in message and "validate on a training dataset" in message
    sweep = scientist.api("post", "/api/v1/tenants/acme/sweeps/", {
        "dataset_version": version_id, "validation_version": held_out,
        "base_model": "tiny-bert", "grid": {"learning_rate": [1e-4, 5e-4]},
    })  # fmt: skip
    assert sweep.status_code == 400
    assert "validation_version" in sweep.json()["error"]["fields"]
    assert not TrainingRun.objects.exists() and not Sweep.objects.exists()
    # A training dataset's version is still fine as validation data.
    other = make_training_version(scientist, name="validation", content=banking_slice(offset=30))
    assert launch(scientist, version_id, validation_version=other).status_code == 202


def test_too_few_rows_per_label_is_refused(scientist, artifacts_dir):
    thin = make_training_version(scientist, name="thin", content=banking_slice(per_label=3))
    response = launch(scientist, thin)
    assert response.status_code == 400
    assert "fewer than 5 rows" in response.json()["error"]["message"]
    assert not TrainingRun.objects.exists()


def test_another_tenants_dataset_version_reads_as_unknown(scientist, version_id, outsider):
    response = outsider.api(
        "post",
        "/api/v1/tenants/globex/runs/",
        {"dataset_version": version_id, "base_model": "tiny-bert"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["dataset_version"] == ["No such dataset version."]
    assert not TrainingRun.objects.exists()


def test_viewer_cannot_launch(viewer, version_id):
    assert launch(viewer, version_id).status_code == 403


def test_tenant_limit_keeps_extra_runs_queued_with_their_position(
    scientist, version_id, tenant, other_tenant
):
    ids = [launch(scientist, version_id).json()["id"] for _ in range(4)]
    other = make_actor("olga", other_tenant, Role.SCIENTIST)
    other_version = make_training_version_for(other)
    other_run = other.api(
        "post",
        "/api/v1/tenants/globex/runs/",
        {"dataset_version": other_version, "base_model": "tiny-bert"},
    ).json()
    sent = services.runs_dispatch()
    # acme's limit is 2: its first two go; globex is not starved by acme's backlog.
    assert set(sent) == {ids[0], ids[1], other_run["id"]}
    listed = {r["id"]: r for r in scientist.api("get", RUNS).json()["results"]}
    assert listed[ids[2]]["queue_position"] == 1
    assert listed[ids[3]]["queue_position"] == 2
    assert listed[ids[0]]["queue_position"] is None
    assert services.runs_dispatch() == []  # nothing more until one finishes


def make_training_version_for(actor) -> str:
    from django.core.files.uploadedfile import SimpleUploadedFile

    dataset = actor.api(
        "post", "/api/v1/tenants/globex/datasets/", {"name": "theirs", "kind": "training"}
    ).json()["id"]
    response = actor.client.post(
        f"/api/v1/tenants/globex/datasets/{dataset}/versions/",
        {"file": SimpleUploadedFile("t.csv", banking_slice())},
    )
    return str(response.json()["id"])


def test_cancel_a_queued_run_at_once_and_refuse_a_second_cancel(scientist, version_id):
    run_id = launch(scientist, version_id).json()["id"]
    response = scientist.api("post", f"{RUNS}{run_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = scientist.api("post", f"{RUNS}{run_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["status"] == "cancelled"


def test_a_run_whose_holder_died_on_this_host_is_requeued_without_waiting_out_its_lease(
    scientist, version_id
):
    import socket
    import subprocess
    import sys

    from apps.audit.models import AuditEvent

    alive, gone = (launch(scientist, version_id).json()["id"] for _ in range(2))
    services.runs_dispatch()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid names no process now
    host = socket.gethostname()
    assert services.run_claim(run_id=alive, worker=f"{host}:1") is not None  # init: alive
    assert services.run_claim(run_id=gone, worker=f"{host}:{child.pid}") is not None
    assert services.runs_requeue_stale() == [gone]  # both leases are fresh
    assert TrainingRun.objects.get(pk=gone).status == "queued"
    assert TrainingRun.objects.get(pk=alive).status == "running"
    event = AuditEvent.objects.get(object_id=gone, verb="run.requeue")
    assert event.after is not None and event.after["reason"] == "worker process gone"


def test_claim_is_exclusive_and_a_stale_run_is_requeued(scientist, version_id):
    from datetime import timedelta

    from django.utils import timezone

    run_id = launch(scientist, version_id).json()["id"]
    services.runs_dispatch()
    first = services.run_claim(run_id=run_id, worker="a")
    second = services.run_claim(run_id=run_id, worker="b")
    assert first is not None and first.attempt == 1
    assert second is None  # a redelivered task finds the run taken
    TrainingRun.objects.filter(pk=run_id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert services.runs_requeue_stale(timeout=timedelta(seconds=30)) == [run_id]
    # The old worker's writes are fenced off once it lost the run.
    assert not services.run_heartbeat(run_id=run_id, attempt=1).held
    services.runs_dispatch()
    resumed = services.run_claim(run_id=run_id, worker="b")
    assert resumed is not None and resumed.attempt == 2
    assert TrainingRun.objects.get(pk=run_id).status == RunStatus.RUNNING


def test_rerun_launches_the_same_config(scientist, version_id):
    original = launch(scientist, version_id, params={"epochs": 2, "seed": 7}).json()
    response = scientist.api("post", f"{RUNS}{original['id']}/rerun")
    assert response.status_code == 202
    rerun = response.json()
    assert rerun["params"] == original["params"] and rerun["rerun_of"] == original["id"]


def test_sweep_launches_one_run_per_grid_point(scientist, version_id):
    response = scientist.api(
        "post",
        "/api/v1/tenants/acme/sweeps/",
        {
            "dataset_version": version_id,
            "base_model": "tiny-bert",
            "params": {"epochs": 1},
            "grid": {"learning_rate": [1e-4, 5e-4], "batch_size": [8, 16]},
            "metric": "val_macro_f1",
            "goal": "max",
        },
    )
    assert response.status_code == 202, response.content
    sweep = response.json()
    assert len(sweep["runs"]) == 4
    combos = {(r["params"]["learning_rate"], r["params"]["batch_size"]) for r in sweep["runs"]}
    assert combos == {(1e-4, 8), (1e-4, 16), (5e-4, 8), (5e-4, 16)}
    bad = scientist.api(
        "post",
        "/api/v1/tenants/acme/sweeps/",
        {"dataset_version": version_id, "base_model": "tiny-bert", "grid": {"epochs": [0, 1]}},
    )
    assert bad.status_code == 400 and "grid" in bad.json()["error"]["fields"]
    assert TrainingRun.objects.count() == 4
