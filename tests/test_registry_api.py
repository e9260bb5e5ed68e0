"""Model versions through the API and the models page: what a version records of its format
(full, or an adapter on a shared base), and its export as a standalone merged model."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from apps.datasets.models import DatasetVersion
from apps.registry import services as registry
from apps.registry.models import ModelVersion
from apps.tenants.models import Tenant
from apps.training import services as training
from apps.training.models import TrainingRun
from apps.training.packaging import pack_dir, unpack
from tests.conftest import Actor
from tests.training_helpers import make_training_version, placeholder_version

pytestmark = pytest.mark.django_db
MODELS = "/api/v1/tenants/acme/models"
BASE_SHA = "b" * 64
LABELS = ("card_declined", "card_arrival", "top_up")


def register(actor: Actor, tenant: Tenant, model_dir: Path, tmp: Path, **fields: Any) -> Any:
    """A version as a run registers it, its artifact packed from ``model_dir`` and stored."""
    from apps.core.artifacts import get_store

    data = DatasetVersion.objects.filter(dataset__tenant=tenant).first() or (
        DatasetVersion.objects.get(pk=make_training_version(actor))
    )
    run = training.run_launch(actor=actor.user, tenant=tenant, dataset_version=data,
                              base_model="tiny-bert", params={}, model_name="intents")  # fmt: skip
    sha256, size = pack_dir(model_dir, tmp / "model.tar")
    key = f"models/{tenant.pk}/{run.pk}/model.tar"
    get_store().put_file(key, tmp / "model.tar")
    return registry.model_version_create(
        run=run, artifact_key=key, sha256=sha256, size_bytes=size, memory_bytes=size,
        predictions_key="", labels=["a", "b"], metrics={}, **fields,
    )  # fmt: skip


def export(actor: Actor, number: int = 1, name: str = "intents") -> Any:
    return actor.client.get(f"{MODELS}/{name}/versions/{number}/export")


def tar_members(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def full_model_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "bert"}')
    (root / "model.safetensors").write_bytes(b"weights" * 100)
    (root / "labels.json").write_text('{"0": "a", "1": "b"}')
    return root


def make_adapter_dir(target: Path, labels: tuple[str, ...] = LABELS) -> Path:
    """An adapter model directory as an adapter run writes it, with a random (non-zero)
    update: peft starts B at zero, which would leave nothing to merge."""
    import torch

    from worker import adapters

    torch.manual_seed(0)
    model, _ = adapters.build_adapter_classifier(
        "minilm-l6-lora",
        lora={"lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
              "lora_target_modules": ["query", "value"]},
        labels=list(labels), max_length=32,
    )  # fmt: skip
    tensors = {
        name: (0.05 * torch.randn(t.shape) if name.endswith("lora_B") else t.clone())
        for name, t in model.adapter_tensors().items()
    }
    adapters.write_adapter_dir(target, meta=model.meta(list(labels)), tensors=tensors,
                               labels=list(labels))  # fmt: skip
    return target


# --- what a version records ---------------------------------------------------------------


def test_versions_state_their_format_base_and_base_memory(
    scientist, tenant, artifacts_dir, tmp_path
):
    placeholder_version(scientist, tenant, sha256="f" * 64)
    adapter = register(
        scientist, tenant, full_model_dir(tmp_path / "m"), tmp_path,
        format="adapter", base_sha256=BASE_SHA, base_memory_bytes=90_000_000,
    )  # fmt: skip
    listed = scientist.api("get", f"{MODELS}/intents/versions/").json()["results"]
    by_sha = {v["sha256"]: v for v in listed}
    assert {k: by_sha["f" * 64][k] for k in ("format", "base_sha256", "base_memory_bytes")} == {
        "format": "full", "base_sha256": "", "base_memory_bytes": 0,
    }  # fmt: skip
    one = scientist.api("get", f"{MODELS}/intents/versions/{adapter.number}/").json()
    assert (one["format"], one["base_sha256"], one["base_memory_bytes"]) == (
        "adapter", BASE_SHA, 90_000_000,
    )  # fmt: skip


def test_models_page_shows_an_adapter_on_its_base_and_the_export_button(
    client: Client, scientist, tenant, artifacts_dir
):
    adapter = placeholder_version(scientist, tenant, sha256="a" * 64)
    ModelVersion.objects.filter(pk=adapter.pk).update(
        format="adapter", base_sha256=BASE_SHA, base_memory_bytes=90 * 1024 * 1024,
        memory_bytes=412 * 1024,
    )  # fmt: skip
    TrainingRun.objects.filter(pk=adapter.run_id).update(base_model="minilm-l6-lora")
    client.force_login(scientist.user)
    html = client.get("/t/acme/models/intents/").content.decode()
    assert "adapter on all-MiniLM-L6-v2 · 412.0\xa0KB own + shared base 90.0\xa0MB" in html
    assert f'href="{MODELS}/intents/versions/{adapter.number}/export"' in html
    assert "Download merged model" in html


# --- export -------------------------------------------------------------------------------


def test_export_of_another_tenants_or_an_unknown_version_is_404(
    scientist, outsider, tenant, artifacts_dir
):
    placeholder_version(scientist, tenant, sha256="f" * 64)
    assert export(outsider).status_code == 404  # acme does not exist for the outsider
    other = outsider.client.get("/api/v1/tenants/globex/models/intents/versions/1/export")
    assert other.status_code == 404
    assert export(scientist, number=2).status_code == 404
    assert export(scientist, name="nope").status_code == 404


def test_a_full_version_exports_as_itself_and_a_second_export_is_a_plain_download(
    viewer, scientist, tenant, artifacts_dir, tmp_path, monkeypatch
):
    version = register(scientist, tenant, full_model_dir(tmp_path / "m"), tmp_path)
    response = export(viewer)  # any member may export
    assert response.status_code == 200, response.content
    body = b"".join(response.streaming_content)
    assert response["Content-Type"] == "application/x-tar"
    assert response["Content-Disposition"] == 'attachment; filename="intents-v1-merged.tar"'
    assert response["X-Content-SHA256"] == hashlib.sha256(body).hexdigest()
    assert int(response["Content-Length"]) == len(body)
    # A full model's directory is copied as it is: the same files, packed the same way.
    assert response["X-Content-SHA256"] == version.sha256
    assert set(tar_members(body)) == {"config.json", "labels.json", "model.safetensors"}

    def no_rebuild(*_: Any) -> None:
        raise AssertionError("the cached export was built again")

    monkeypatch.setattr(registry, "_export_merged", no_rebuild)
    again = export(viewer)
    assert again.status_code == 200
    assert b"".join(again.streaming_content) == body


def test_an_adapter_version_exports_a_merged_model_with_its_own_predictions(
    scientist, tenant, artifacts_dir, tmp_path
):
    from worker import adapters

    texts = ["my card was declined", "where is my new card", "top up by transfer"]
    adapter_dir = make_adapter_dir(tmp_path / "adapter")
    expected = adapters.load_adapter_model(adapter_dir, device="cpu").predict(texts)
    register(scientist, tenant, adapter_dir, tmp_path, format="adapter",
             base_sha256=adapters.read_meta(adapter_dir)["base_sha256"])  # fmt: skip

    response = export(scientist)
    assert response.status_code == 200, response.content
    body = b"".join(response.streaming_content)
    assert response["X-Content-SHA256"] == hashlib.sha256(body).hexdigest()
    (tmp_path / "export.tar").write_bytes(body)
    exported = unpack(tmp_path / "export.tar", tmp_path / "export")
    assert {"config.json", "model.safetensors", "head.safetensors", "labels.json",
            "README.md"} <= {p.name for p in exported.iterdir()}  # fmt: skip
    got = adapters.load_export(exported)(texts)
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], abs=1e-4)


def test_an_adapter_for_other_base_weights_is_not_exported(
    scientist, tenant, artifacts_dir, tmp_path
):
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    meta = {"format": "adapter", "base_model": "minilm-l6-lora", "base": "all-MiniLM-L6-v2",
            "base_sha256": "0" * 64, "r": 4, "alpha": 8.0, "dropout": 0.0,
            "target_modules": ["query"], "max_length": 32, "pooling": "mean",
            "num_labels": 2}  # fmt: skip
    (adapter_dir / "adapter.json").write_text(json.dumps(meta))
    (adapter_dir / "adapter.safetensors").write_bytes(b"")
    (adapter_dir / "labels.json").write_text('{"0": "a", "1": "b"}')
    register(scientist, tenant, adapter_dir, tmp_path, format="adapter", base_sha256="0" * 64)
    response = export(scientist)
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "base_mismatch"


# --- what a run registers -----------------------------------------------------------------


class _NoTracking:
    """MLflow is not what this test is about (the end-to-end training test covers it)."""

    def log_model(self, *_: Any, **__: Any) -> str:
        return "1"

    def end(self, status: str) -> None:
        pass


class _Held:
    """The callbacks of an attempt that still holds its run, as publish_run reads them."""

    def __init__(self, work_dir: Path) -> None:
        self.tracking = _NoTracking()
        self.work_dir = work_dir
        self.lost = False
        self.progress: dict[str, Any] = {}

    def holds(self) -> bool:
        return True

    def log_line(self, line: str) -> None:
        pass


def test_an_adapter_run_registers_an_adapter_version_on_its_base(
    scientist, tenant, artifacts_dir, tmp_path
):
    from apps.training import runner
    from worker import base_models
    from worker.training.loop import TrainResult

    data = DatasetVersion.objects.get(pk=make_training_version(scientist))
    run = training.run_launch(actor=scientist.user, tenant=tenant, dataset_version=data,
                              base_model="minilm-l6-lora", params={})  # fmt: skip
    TrainingRun.objects.filter(pk=run.pk).update(status="running", attempt=1)
    run = TrainingRun.objects.select_related("tenant").get(pk=run.pk)
    result = TrainResult(
        stop_reason="completed", stop_detail="completed 1 epoch", best_epoch=1,
        metrics={"val_macro_f1": 0.9}, model_dir=make_adapter_dir(tmp_path / "adapter"),
        validation_predictions=[{"text": "my card", "label": "a", "predicted": "a",
                                 "score": 0.9}],
        steps=1, resumed_from_step=None, device="cpu",
    )  # fmt: skip
    (tmp_path / "work").mkdir()
    assert runner.publish_run(run, result, _Held(tmp_path / "work")) == "succeeded"  # type: ignore[arg-type]
    version = ModelVersion.objects.get(run=run)
    assert version.format == "adapter"
    assert version.base_sha256 == base_models.base_sha256("minilm-l6-lora")
    assert version.base_memory_bytes > 50_000_000  # the shared MiniLM, counted apart
    assert 0 < version.memory_bytes < 1_000_000  # the tenant's adapter and head only
    assert version.labels == list(LABELS)
    shown = scientist.api("get", f"/api/v1/tenants/acme/runs/{run.pk}/").json()["model_version"]
    assert (shown["number"], shown["format"]) == (version.number, "adapter")


# --- the notebook client ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_notebook_client_exports_a_version_with_a_notebooks_token(
    live_server, scientist, tenant, artifacts_dir, tmp_path
):
    from apps.notebooks.services import NOTEBOOK_TOKEN_PREFIX
    from apps.tenants.services import token_create
    from workbench.client import Workbench, WorkbenchError

    version = register(scientist, tenant, full_model_dir(tmp_path / "m"), tmp_path)
    issued = token_create(user=scientist.user, name=f"{NOTEBOOK_TOKEN_PREFIX}nb_test",
                          tenant=tenant)  # fmt: skip
    wb = Workbench(live_server.url, issued.secret, "acme")
    saved = wb.export_version("intents", 1, tmp_path / "out.tar")
    assert saved == tmp_path / "out.tar"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == version.sha256  # a full model
    with pytest.raises(WorkbenchError) as missing:
        wb.export_version("intents", 2, tmp_path / "none.tar")
    assert missing.value.status == 404 and not (tmp_path / "none.tar").exists()


def test_a_version_whose_artifact_is_not_in_the_store_is_409(scientist, tenant, artifacts_dir):
    placeholder_version(scientist, tenant, sha256="f" * 64)  # its artifact key names nothing
    response = export(scientist)
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "artifact_missing"
