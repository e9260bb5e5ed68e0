"""An autocomplete model's whole lifecycle through the REST API, on a real Celery worker,
the fleet controller (its own process) and a real Ray: a tenant's reply corpus and a golden
set uploaded, a tiny GPT-2 trained on the worker with its own byte-level BPE, evaluated
beside the per-tenant word trigram, its promotion gated and approved, deployed and warmed
up — then the deployment completes exactly as the trained model does in-process, and a
session's next keystrokes reuse its cached keys and values."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.evaluation.models import Evaluation
from apps.registry.models import ModelVersion
from apps.training.models import TrainingRun
from tests.conftest import Actor
from tests.training_helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]
API = "/api/v1/tenants/acme"
SGD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sgd-replies" / "banks_1"
TRAIN_REPLIES = 80
GOLDEN_REPLIES = 20


def _rows(name: str, count: int) -> bytes:
    with (SGD / name).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:count]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["context", "text"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def upload(actor: Actor, name: str, kind: str, replies: bytes) -> str:
    created = actor.api(
        "post", f"{API}/datasets/", {"name": name, "kind": kind, "task": "text-generation"}
    )
    assert created.status_code == 201, created.content
    response = actor.client.post(
        f"{API}/datasets/{created.json()['id']}/versions/",
        {"file": SimpleUploadedFile("replies.csv", replies)},
    )
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def test_an_autocomplete_model_trains_passes_its_gates_deploys_and_completes_as_it_should(
    tmp_path: Path,
    celery_worker_process: Any,
    fleet_controller_process: Any,
    mlflow_server: str,
    ray_address: str,
    scientist: Actor,
    reviewer: Actor,
    admin: Actor,
    settings: Any,
) -> None:
    from apps.core.artifacts import get_store
    from apps.deployments.backends import reset_backend
    from apps.training.packaging import unpack
    from worker.autocomplete import load_completer

    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    settings.MLFLOW_TRACKING_URI = mlflow_server
    settings.RAY_ADDRESS = ray_address
    reset_backend()
    train_id = upload(scientist, "replies", "training", _rows("train.csv", TRAIN_REPLIES))
    upload(reviewer, "replies-golden", "golden", _rows("test.csv", GOLDEN_REPLIES))
    # A tiny run cannot be held to the defaults; the gates still decide (the trigram is the
    # champion: a regression of more than 0.9 against it would block).
    policy = {"gates": [{"metric": "next_word_top1", "op": ">=", "value": 0.01}],
              "max_regression_vs_champion": 0.9}  # fmt: skip
    assert admin.api("put", f"{API}/policies/autocomplete/", policy).status_code == 200

    launch = {"dataset_version": train_id, "model_name": "replies",
              "params": {"epochs": 2, "max_length": 48, "batch_size": 16}}  # fmt: skip
    launched = scientist.api("post", f"{API}/runs/", launch)
    assert launched.status_code == 202, launched.content
    assert launched.json()["base_model"] == "tiny-gpt2"  # the default for reply corpora
    run_id = launched.json()["id"]
    wait_for(lambda: TrainingRun.objects.get(pk=run_id).status in ("succeeded", "failed"),
             timeout=300)  # fmt: skip
    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == "succeeded", run.error
    version = ModelVersion.objects.get(run_id=run_id)
    assert version.registered_model.kind == "autocomplete" and version.format == "full"
    assert {"val_loss", "val_perplexity"} <= set(run.metrics)

    response = scientist.api("post", f"{API}/promotions/",
                             {"model_version": version.pk, "target": "staging"})  # fmt: skip
    assert response.status_code == 202, response.content
    promotion = f"{API}/promotions/{response.json()['id']}/"

    def status_after(waiting: str) -> str | None:
        status = str(scientist.api("get", promotion).json()["status"])
        return status if status != waiting else None

    assert wait_for(lambda: status_after("checking"), timeout=240) == "awaiting_approval", (
        scientist.api("get", promotion).json()
    )
    evaluation = Evaluation.objects.get(
        pk=scientist.api("get", promotion).json()["evaluation_ids"][0]
    )
    assert evaluation.metrics["task"] == "text-generation"
    assert evaluation.metrics["replies"] == GOLDEN_REPLIES
    assert 0.0 <= evaluation.metrics["next_word_top1"] <= evaluation.metrics["next_word_top3"]
    assert evaluation.metrics["perplexity"] > 1.0
    assert evaluation.base_metrics["next_word_top1"] > 0  # the trigram, measured beside it

    approved = reviewer.api("post", f"{promotion}approve", {"comment": "ok"})
    assert approved.status_code == 200, approved.content
    assert wait_for(lambda: status_after("deploying"), timeout=300) == "done", scientist.api(
        "get", f"{API}/deployments/"
    ).json()
    (deployment,) = scientist.api("get", f"{API}/deployments/").json()["results"]
    assert deployment["status"] == "warm" and deployment["environment"] == "staging"
    detail = scientist.api("get", f"{API}/deployments/{deployment['id']}/").json()
    assert detail["warmups"][0]["ok"]

    # The deployed model completes as the trained model does in-process, greedy.
    archive = tmp_path / "model.tar"
    with get_store().open(version.artifact_key) as fh:
        archive.write_bytes(fh.read())
    completer = load_completer(unpack(archive, tmp_path / "model"))
    context = "I would like to transfer some money."
    for prefix in ("Great, who would", "Which account", "Okay. Just to"):
        (want,) = completer.complete(prefix, context, max_tokens=8)
        answer = scientist.api("post", f"{API}/models/replies/complete",
                               {"prefix": prefix, "context": context, "max_tokens": 8,
                                "environment": "staging"})  # fmt: skip
        assert answer.status_code == 200, answer.content
        assert answer.json()["completions"][0]["text"] == want.text
    # Typing on in one session: the second call reuses the first one's keys and values.
    typed = {"context": context, "max_tokens": 8, "session": "agent-7", "environment": "staging"}
    first = scientist.api("post", f"{API}/models/replies/complete", {**typed, "prefix": "Which"})
    second = scientist.api(
        "post", f"{API}/models/replies/complete", {**typed, "prefix": "Which account would"}
    )
    assert first.status_code == second.status_code == 200, second.content
    assert second.json()["cached_tokens"] > 0
    (alone,) = completer.complete("Which account would", context, max_tokens=8)
    assert second.json()["completions"][0]["text"] == alone.text
    reset_backend()
