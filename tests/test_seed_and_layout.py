"""The demo seed behind `make run`, and the layering rules of DESIGN.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client

from apps.datasets.models import Dataset
from apps.tenants.models import Membership
from tests.conftest import BANKING77

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.django_db
def test_seed_demo_creates_a_usable_demo_tenant_and_is_idempotent(artifacts_dir):
    if not (BANKING77 / "train.csv").is_file():
        pytest.skip("the shared banking77 data is not beside the repository")
    call_command("seed_demo")
    call_command("seed_demo")
    roles = dict(
        Membership.objects.filter(tenant__slug="demo").values_list("user__username", "role")
    )
    assert roles == {"scientist": "scientist", "reviewer": "reviewer", "admin": "admin"}
    datasets = {d.name: d for d in Dataset.objects.filter(tenant__slug="demo")}
    assert set(datasets) == {
        "banking77-train",
        "banking77-golden",
        "stackfaq-train",
        "stackfaq-golden",
        "sgd-banks-replies",
        "sgd-banks-replies-golden",
    }
    train = datasets["banking77-train"].versions.get()
    assert train.rows > 10_000 and len(train.labels) == 77
    assert datasets["banking77-golden"].versions.count() == 1
    # Golden sets are the reviewer's (scientists may not change them).
    assert datasets["banking77-golden"].versions.get().created_by.username == "reviewer"
    client = Client()
    assert client.login(username="scientist", password="workbench-demo")
    assert client.get("/api/v1/tenants/demo/datasets/").json()["count"] == 6
    # StackFAQ for retrieval: its pairs with the 125 FAQ answers, the test pairs golden.
    faq_train = datasets["stackfaq-train"].versions.get()
    faq_golden = datasets["stackfaq-golden"].versions.get()
    assert datasets["stackfaq-train"].task == "retrieval"
    assert faq_train.documents_count == faq_golden.documents_count == 125
    assert faq_train.documents_sha256 == faq_golden.documents_sha256
    assert faq_train.profile["pairs"] == 874 and faq_golden.profile["pairs"] == 375
    assert faq_golden.created_by.username == "reviewer"
    # The scientist's first run, naming nothing but the data, trains the adapter base with
    # the defaults benchmarks/adapter_training.py measures on exactly this data (banking77
    # full train -> its test set, the demo's golden set), which pass the default policy.
    run = client.post(
        "/api/v1/tenants/demo/runs/",
        {"dataset_version": train.pk},
        content_type="application/json",
    )
    assert run.status_code == 202, run.content
    body = run.json()
    assert body["base_model"] == "minilm-l6-lora"
    assert {k: body["params"][k] for k in ("epochs", "batch_size", "lora_r")} == {
        "epochs": 5,
        "batch_size": 32,
        "lora_r": 8,
    }


def test_worker_package_never_imports_django_or_apps():
    offenders = []
    for path in (ROOT / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path}: {n}" for n in names if n.split(".")[0] in {"django", "apps", "workbench"}
            ]
    assert offenders == []


def test_apps_do_not_import_the_project_package_except_for_celery():
    offenders = []
    for path in (ROOT / "apps").rglob("*.py"):
        if "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("workbench")
            ) and node.module not in {"workbench.celery"}:
                offenders.append(f"{path}: {node.module}")
    assert offenders == []
