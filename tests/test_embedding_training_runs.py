"""Embedding runs through the workbench: a retrieval dataset trains an embedding base model
and nothing else (and a classification dataset no embedding model), the catalogue's
defaults resolve into the run's params, and a run on a worker registers an embedding model
version (an adapter of the shared base, no labels, its own bytes as memory)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from apps.datasets.models import DatasetVersion
from apps.registry.models import ModelVersion
from apps.training import runner
from apps.training.models import TrainingRun
from tests.embedding_helpers import knowledge_base
from tests.training_helpers import make_training_version
from worker import base_models

RUNS = "/api/v1/tenants/acme/runs/"
SMALL = {
    "epochs": 1,
    "batch_size": 8,
    "max_length": 32,
    "lora_r": 4,
    "lora_target_modules": ["query", "value"],
    "validation_split": 0.25,
    "log_every_steps": 1,
}


def test_retrieval_data_trains_an_embedding_base_model_only(scientist: Any, tenant: Any) -> None:
    faq = knowledge_base(tenant, count=6)
    wrong = scientist.api("post", RUNS, {"dataset_version": faq.pk, "base_model": "minilm-l6-lora"})
    assert wrong.status_code == 400, wrong.content
    fields = wrong.json()["error"]["fields"]
    assert set(fields) == {"base_model", "dataset_version"}
    assert "minilm-l6-lora" in fields["base_model"][0]
    assert "minilm-l6-embed" in fields["base_model"][0]

    intents = make_training_version(scientist)
    backwards = scientist.api(
        "post", RUNS, {"dataset_version": intents, "base_model": "minilm-l6-embed"}
    )
    assert backwards.status_code == 400, backwards.content
    assert "minilm-l6-embed" in backwards.json()["error"]["fields"]["base_model"][0]
    assert not TrainingRun.objects.exists()

    # Naming no base model: the embedding base, with its defaults resolved into the params.
    run = scientist.api("post", RUNS, {"dataset_version": faq.pk, "params": {"seed": 2}})
    assert run.status_code == 202, run.content
    body = run.json()
    assert body["base_model"] == "minilm-l6-embed"
    defaults = base_models.get("minilm-l6-embed").defaults()
    assert {name: body["params"][name] for name in defaults} == defaults
    assert body["params"]["separate_encoders"] is False
    classifier = scientist.api("post", RUNS, {"dataset_version": intents}).json()
    assert "separate_encoders" not in classifier["params"]
    assert "document_fields" not in classifier["params"]

    # A classifier's parameters... and the other way round.
    refused = scientist.api(
        "post",
        RUNS,
        {"dataset_version": intents, "base_model": "tiny-bert",
         "params": {"separate_encoders": True}},
    )  # fmt: skip
    assert refused.status_code == 400
    assert "separate_encoders" in str(refused.json())


@pytest.mark.django_db(transaction=True)
def test_an_embedding_run_trains_on_a_worker_and_registers_an_embedding_version(
    scientist: Any, tenant: Any, artifacts_dir: Any, settings: Any, tmp_path: Any
) -> None:
    settings.TRAINING_WORK_DIR = tmp_path / "work"
    settings.MLFLOW_TRACKING_URI = f"sqlite:///{tmp_path / 'mlflow.sqlite3'}"
    faq: DatasetVersion = knowledge_base(tenant, count=8)
    response = scientist.api(
        "post",
        RUNS,
        {"dataset_version": faq.pk, "model_name": "faq-search",
         "params": {**SMALL, "separate_encoders": True}},
    )  # fmt: skip
    assert response.status_code == 202, response.content
    run_id = response.json()["id"]
    assert runner.execute(run_id, worker="test:1") == "succeeded"

    run = TrainingRun.objects.get(pk=run_id)
    assert {"val_recall_at_1", "val_recall_at_5", "val_mrr_at_10"} <= set(run.metrics)
    names = set(run.metric_points.values_list("name", flat=True))
    assert {"train_loss", "val_recall_at_5", "val_mrr_at_10"} <= names
    version = ModelVersion.objects.select_related("registered_model").get(run=run)
    assert version.registered_model.kind == "embedding"
    assert version.format == "adapter" and version.labels == []
    assert version.base_sha256 == base_models.base_sha256("minilm-l6-embed")
    assert 0 < version.memory_bytes < 1_000_000  # two small LoRA encoders, not the base
    assert version.base_memory_bytes > 50_000_000

    # The run page draws the run's recall@k and MRR@10 per epoch.
    browser = Client()
    browser.force_login(scientist.user)
    page = browser.get(f"/t/acme/runs/{run_id}/")
    assert page.status_code == 200
    assert b"Validation recall@k and MRR@10 per epoch" in page.content
    assert b"validation recall@5" in page.content

    # The registered model holds embedding versions: a classifier run into it is refused.
    intents = make_training_version(scientist)
    mixed = scientist.api("post", RUNS, {"dataset_version": intents, "model_name": "faq-search"})
    assert mixed.status_code == 400, mixed.content
    assert "model_name" in mixed.json()["error"]["fields"]


def test_the_launch_form_trains_an_embedding_model_with_its_defaults(
    scientist: Any, tenant: Any, artifacts_dir: Any
) -> None:
    faq = knowledge_base(tenant, count=6)
    browser = Client()
    browser.force_login(scientist.user)
    form = browser.get("/t/acme/runs/").content.decode()
    assert f"v{faq.number} · {faq.rows:,} pairs · 6 documents" in form
    data = {
        "dataset_version": faq.pk, "validation_version": "", "base_model": "minilm-l6-embed",
        "model_name": "", "epochs": "", "learning_rate": "", "batch_size": "",
        "max_length": "", "seed": "0", "patience": "", "validation_split": "0.1",
        "separate_encoders": "on",
    }  # fmt: skip
    response = browser.post("/t/acme/runs/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    run = TrainingRun.objects.get()
    assert run.base_model == "minilm-l6-embed"
    assert run.params["max_length"] == 128 and run.params["separate_encoders"] is True
    # A classifier base on the same retrieval data: the form names the mismatch.
    refused = browser.post("/t/acme/runs/", {**data, "base_model": "minilm-l6-lora"})
    assert refused.status_code == 400
    assert "minilm-l6-embed" in refused.content.decode()
    assert TrainingRun.objects.count() == 1
