"""Autocomplete runs through the workbench: a reply corpus trains an autocomplete base model
and nothing else (and labelled texts no autocomplete model), the catalogue's defaults resolve
into the run's params, and a run on a worker registers an autocomplete model version (a full
model, no labels) whose run page charts next-word accuracy and perplexity and shows sample
completions of held-out prefixes."""

from __future__ import annotations

import csv
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from apps.registry.models import ModelVersion
from apps.training import runner
from apps.training.models import TrainingRun
from tests.autocomplete_helpers import reply_version
from tests.training_helpers import make_training_version
from worker import base_models

RUNS = "/api/v1/tenants/acme/runs/"
SGD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sgd-replies" / "banks_1"
SMALL = {"epochs": 2, "batch_size": 8, "max_length": 40, "validation_split": 0.25,
         "log_every_steps": 1}  # fmt: skip


def banks_replies(count: int) -> list[tuple[str, str]]:
    with (SGD / "train.csv").open(encoding="utf-8", newline="") as handle:
        return [(row["context"], row["text"]) for row in list(csv.DictReader(handle))[:count]]


@pytest.fixture
def tiny_shape() -> Iterator[None]:
    """A 2-layer, 64-wide GPT-2 rather than the catalogue's: the worker runs in-process."""
    saved = dict(base_models.TINY_GPT2_SHAPE)
    base_models.TINY_GPT2_SHAPE.update(n_layer=2, n_embd=64, n_head=2, n_positions=64)
    yield
    base_models.TINY_GPT2_SHAPE.clear()
    base_models.TINY_GPT2_SHAPE.update(saved)


def test_reply_corpora_train_an_autocomplete_base_model_only(
    scientist: Any, tenant: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies = reply_version(tenant, replies=banks_replies(12))
    wrong = scientist.api("post", RUNS, {"dataset_version": replies.pk, "base_model": "tiny-bert"})
    assert wrong.status_code == 400, wrong.content
    fields = wrong.json()["error"]["fields"]
    assert set(fields) == {"base_model", "dataset_version"}
    assert "text-generation" in fields["base_model"][0]
    assert "tiny-gpt2" in fields["base_model"][0]

    intents = make_training_version(scientist)
    backwards = scientist.api("post", RUNS, {"dataset_version": intents, "base_model": "tiny-gpt2"})
    assert backwards.status_code == 400, backwards.content
    message = backwards.json()["error"]["fields"]["base_model"][0]
    assert "tiny-bert" in message and "tiny-gpt2" in message
    # Only autocomplete bases take init_from; pretrained needs a causal LM installed.
    refused = scientist.api(
        "post", RUNS,
        {"dataset_version": intents, "base_model": "tiny-bert", "params": {"init_from": "scratch"}},
    )  # fmt: skip
    assert refused.status_code == 400 and "init_from" in str(refused.json())
    monkeypatch.delenv(base_models.CAUSAL_LM_PATH_ENV, raising=False)
    pretrained = scientist.api(
        "post", RUNS, {"dataset_version": replies.pk, "params": {"init_from": "pretrained"}}
    )
    assert pretrained.status_code == 400
    assert base_models.CAUSAL_LM_PATH_ENV in str(pretrained.json())
    assert not TrainingRun.objects.exists()

    # Naming no base model: the tiny GPT-2, with its defaults resolved into the params.
    run = scientist.api("post", RUNS, {"dataset_version": replies.pk, "params": {"seed": 2}})
    assert run.status_code == 202, run.content
    body = run.json()
    assert body["base_model"] == "tiny-gpt2"
    defaults = base_models.get("tiny-gpt2").defaults()
    assert {name: body["params"][name] for name in defaults} == defaults
    assert body["params"]["init_from"] == "scratch"
    assert "lora_r" not in body["params"] and "document_fields" not in body["params"]
    classifier = scientist.api("post", RUNS, {"dataset_version": intents}).json()
    assert "init_from" not in classifier["params"]

    # A version of one reply cannot hold any out for validation.
    lone = reply_version(tenant, name="lone", replies=[("", "Hello there.")])
    thin = scientist.api("post", RUNS, {"dataset_version": lone.pk})
    assert thin.status_code == 400 and "at least 2 replies" in str(thin.json())


@pytest.mark.django_db(transaction=True)
def test_an_autocomplete_run_trains_on_a_worker_and_registers_an_autocomplete_version(
    scientist: Any, tenant: Any, artifacts_dir: Any, settings: Any, tmp_path: Path,
    tiny_shape: None,
) -> None:  # fmt: skip
    import torch

    from apps.core.artifacts import get_store

    settings.TRAINING_WORK_DIR = tmp_path / "work"
    settings.MLFLOW_TRACKING_URI = f"sqlite:///{tmp_path / 'mlflow.sqlite3'}"
    replies = reply_version(tenant, replies=banks_replies(32))
    response = scientist.api(
        "post", RUNS, {"dataset_version": replies.pk, "model_name": "replies", "params": SMALL}
    )
    assert response.status_code == 202, response.content
    run_id = response.json()["id"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine ran two threads 20x slower
    try:
        assert runner.execute(run_id, worker="test:1") == "succeeded"
    finally:
        torch.set_num_threads(threads)

    run = TrainingRun.objects.get(pk=run_id)
    assert {"val_loss", "val_perplexity", "val_next_word_top1", "train_loss"} <= set(run.metrics)
    names = set(run.metric_points.values_list("name", flat=True))
    assert {"train_loss", "val_loss", "val_perplexity", "val_next_word_top1"} <= names
    assert run.samples and {"prefix", "completion", "reference", "matched"} <= set(run.samples[0])
    version = ModelVersion.objects.select_related("registered_model").get(run=run)
    assert version.registered_model.kind == "autocomplete"
    assert version.format == "full" and version.labels == [] and version.base_sha256 == ""
    assert version.memory_bytes >= version.size_bytes // 2 > 0
    archive = tmp_path / "model.tar"
    with get_store().open(version.artifact_key) as fh:
        archive.write_bytes(fh.read())
    with tarfile.open(archive) as tar:
        names = {Path(name).name for name in tar.getnames()}
    assert {"autocomplete.json", "config.json", "model.safetensors", "tokenizer.json"} <= names

    # The run page charts next-word accuracy and perplexity and shows the sample completions.
    browser = Client()
    browser.force_login(scientist.user)
    page = browser.get(f"/t/acme/runs/{run_id}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Validation next-word top-1 accuracy per epoch" in html
    assert "Validation perplexity per epoch" in html
    assert 'id="run-samples-table"' in html
    assert run.samples[0]["prefix"] in html

    # The registered model holds autocomplete versions: a classifier run into it is refused.
    intents = make_training_version(scientist)
    mixed = scientist.api("post", RUNS, {"dataset_version": intents, "model_name": "replies"})
    assert mixed.status_code == 400, mixed.content
    assert "model_name" in mixed.json()["error"]["fields"]


def test_the_launch_form_trains_an_autocomplete_model_with_its_defaults(
    scientist: Any, tenant: Any, artifacts_dir: Any
) -> None:
    replies = reply_version(tenant, replies=banks_replies(12))
    browser = Client()
    browser.force_login(scientist.user)
    form = browser.get("/t/acme/runs/").content.decode()
    assert f"v{replies.number} · 12 replies" in form
    assert 'data-for-bases="tiny-gpt2"' in form
    data = {
        "dataset_version": replies.pk, "validation_version": "", "base_model": "tiny-gpt2",
        "model_name": "", "epochs": "", "learning_rate": "", "batch_size": "",
        "max_length": "", "seed": "0", "patience": "2", "validation_split": "0.1",
        "init_from": "",
    }  # fmt: skip
    response = browser.post("/t/acme/runs/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    run = TrainingRun.objects.get()
    assert run.base_model == "tiny-gpt2"
    defaults = base_models.get("tiny-gpt2").defaults()
    assert run.params["max_length"] == defaults["max_length"]
    assert run.params["init_from"] == "scratch" and run.params["patience"] == 2
    # A classifier base on the same reply corpus: the form names the fitting base.
    refused = browser.post("/t/acme/runs/", {**data, "base_model": "tiny-bert"})
    assert refused.status_code == 400
    assert "tiny-gpt2" in refused.content.decode()
    assert TrainingRun.objects.count() == 1
