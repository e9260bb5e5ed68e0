"""LoRA adapters on the shared MiniLM: trained through the usual loop, stored as only what the
tenant adds, resumed bit for bit, served many to one base, and exported standalone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.worker.conftest import LABELS, Recorder, SimulatedCrash, tiny_config, write_slice
from tests.worker.serving.models import adapter_variant
from worker import adapters, base_models
from worker.footprint import measure_memory_bytes
from worker.inference import load_classifier
from worker.modeling import artifact_format
from worker.training.config import DataSpec
from worker.training.loop import ReportingError, TrainResult, train


def adapter_config(**overrides: object) -> object:
    values: dict[str, object] = {
        "base_model": base_models.MINILM_L6_LORA,
        "epochs": 2,
        "learning_rate": 3e-3,
        "batch_size": 16,
        "max_length": 32,
        "lora_r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.1,
        "lora_target_modules": ["query", "value"],
    }
    return tiny_config(**{**values, **overrides})


@pytest.fixture(scope="module")
def small_slice(tmp_path_factory: pytest.TempPathFactory) -> DataSpec:
    """4 labels x 16 rows: 52 to train on (4 steps of 16), 12 to validate."""
    path = write_slice(tmp_path_factory.mktemp("lora") / "slice.csv", LABELS[:4], 16)
    return DataSpec(path=path, text_column="text", label_column="category", format="csv")


@pytest.fixture(scope="module")
def trained(small_slice: DataSpec, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train(
        adapter_config(),  # type: ignore[arg-type]
        small_slice,
        validation_data=None,
        work_dir=tmp_path_factory.mktemp("run"),
        callbacks=Recorder(),
    )


def test_the_artifact_holds_only_the_adapter_the_head_and_the_labels(
    trained: TrainResult,
) -> None:
    files = sorted(p.name for p in trained.model_dir.iterdir())
    assert files == ["adapter.json", "adapter.safetensors", "labels.json"]
    meta = json.loads((trained.model_dir / "adapter.json").read_text())
    assert meta["base_sha256"] == base_models.minilm_sha256()
    assert (meta["r"], meta["alpha"], meta["target_modules"]) == (4, 8.0, ["query", "value"])
    tensors = load_file(trained.model_dir / "adapter.safetensors")
    # 6 layers x (query, value) x (A, B), and the head.
    assert len(tensors) == 6 * 2 * 2 + 2
    assert tensors["encoder.layer.0.attention.self.query.lora_A"].shape == (4, 384)
    assert tensors["head.weight"].shape == (4, 384)
    own = sum(t.numel() * 4 for t in tensors.values())
    assert (trained.model_dir / "adapter.safetensors").stat().st_size < 200_000
    # memory_bytes is what the tenant adds, not the 90 MB base.
    assert measure_memory_bytes(trained.model_dir, ["hello"]) == own
    assert artifact_format(trained.model_dir) == {
        "format": "adapter",
        "base_model": "minilm-l6-lora",
        "base_sha256": base_models.minilm_sha256(),
        "base_memory_bytes": (base_models.minilm_path() / "model.safetensors").stat().st_size,
    }


def test_the_adapter_learns_and_predicts_as_its_validation_said(trained: TrainResult) -> None:
    assert trained.metrics["val_accuracy"] >= 0.75
    model = load_classifier(trained.model_dir, device="cpu")
    texts = [p["text"] for p in trained.validation_predictions]
    predictions = model.predict(texts)
    assert [p["label"] for p in predictions] == [
        p["predicted"] for p in trained.validation_predictions
    ]
    assert [p["score"] for p in predictions] == pytest.approx(
        [p["score"] for p in trained.validation_predictions], abs=1e-5
    )


def test_a_mixed_tenant_batch_predicts_as_each_tenant_alone(
    trained: TrainResult, tmp_path: Path
) -> None:
    # A second tenant: another adapter with other weights and ranks on the same base.
    second = adapter_variant(trained.model_dir, tmp_path / "second", seed=1, rank=2)
    first_model = load_classifier(trained.model_dir, device="cpu")
    second_model = load_classifier(second, device="cpu")
    assert first_model.base is second_model.base  # one base per process
    texts = [p["text"] for p in trained.validation_predictions]
    alone = [first_model.predict(texts), second_model.predict(texts[::-1])]
    mixed = adapters.predict_mixed([(first_model, texts), (second_model, texts[::-1])])
    for own, together in zip(alone, mixed, strict=True):
        assert [p["label"] for p in together] == [p["label"] for p in own]
        assert [p["score"] for p in together] == pytest.approx([p["score"] for p in own], abs=1e-5)
    # The two tenants really differ on the same texts: per-row selection is what matched.
    second_on_same = second_model.predict(texts)
    assert (
        max(abs(a["score"] - b["score"]) for a, b in zip(alone[0], second_on_same, strict=True))
        > 0.01
    )


def test_an_adapter_for_other_base_weights_is_refused(trained: TrainResult, tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    other.mkdir()
    for name in ("adapter.safetensors", "labels.json"):
        (other / name).write_bytes((trained.model_dir / name).read_bytes())
    meta = json.loads((trained.model_dir / "adapter.json").read_text())
    (other / "adapter.json").write_text(json.dumps({**meta, "base_sha256": "0" * 64}))
    with pytest.raises(adapters.AdapterError, match="this host holds minilm-l6-lora"):
        load_classifier(other, device="cpu")


def test_resume_of_an_adapter_run_is_bit_identical(small_slice: DataSpec, tmp_path: Path) -> None:
    config = adapter_config(epochs=2, checkpoint_every_steps=3)
    uninterrupted = train(
        config,  # type: ignore[arg-type]
        small_slice,
        validation_data=None,
        work_dir=tmp_path / "whole",
        callbacks=Recorder(),
    )
    crashing = Recorder(crash_at_checkpoint=1)
    with pytest.raises(ReportingError) as crash:
        train(
            config,  # type: ignore[arg-type]
            small_slice,
            validation_data=None,
            work_dir=tmp_path / "crashed",
            callbacks=crashing,
        )
    assert isinstance(crash.value.__cause__, SimulatedCrash)
    checkpoint_dir, step = crashing.checkpoints[-1]
    assert step == 3
    # The checkpoint holds the adapter only, not a copy of the base.
    assert sorted(p.name for p in (checkpoint_dir / "model").iterdir()) == [
        "adapter.json",
        "adapter.safetensors",
        "labels.json",
    ]
    resumed = train(
        config,  # type: ignore[arg-type]
        small_slice,
        validation_data=None,
        work_dir=tmp_path / "resumed",
        callbacks=Recorder(),
        resume_dir=checkpoint_dir,
    )
    assert resumed.resumed_from_step == 3
    assert resumed.metrics == uninterrupted.metrics
    assert resumed.validation_predictions == uninterrupted.validation_predictions
    whole = load_file(uninterrupted.model_dir / "adapter.safetensors")
    again = load_file(resumed.model_dir / "adapter.safetensors")
    assert all(torch.equal(whole[name], again[name]) for name in whole)


def test_the_export_serves_without_the_workbench_and_predicts_the_same(
    trained: TrainResult, tmp_path: Path
) -> None:
    target = tmp_path / "export"
    adapters.export_merged(trained.model_dir, target)
    assert {"config.json", "model.safetensors", "tokenizer.json", "head.safetensors"} <= {
        p.name for p in target.iterdir()
    }
    exported = adapters.load_export(target)  # plain transformers, the README's recipe
    texts = [p["text"] for p in trained.validation_predictions]
    served = load_classifier(trained.model_dir, device="cpu").predict(texts)
    standalone = exported(texts)
    assert [p["label"] for p in standalone] == [p["label"] for p in served]
    assert [p["score"] for p in standalone] == pytest.approx([p["score"] for p in served], abs=1e-4)


def test_lora_parameters_are_checked() -> None:
    errors = adapter_config(lora_r=0, lora_target_modules=["mlp"]).validate()  # type: ignore[attr-defined]
    assert set(errors) == {"lora_r", "lora_target_modules"}
    assert "query" in errors["lora_target_modules"]
    full = tiny_config(lora_r=8).validate()
    assert "Only adapter base models" in full["lora_r"]


def test_evaluation_of_an_adapter_predicts_as_serving_does(trained: TrainResult) -> None:
    import csv

    from worker.evaluation import evaluate
    from worker.training.config import DataSpec

    rows = trained.validation_predictions
    data = trained.model_dir.parent / "golden.csv"
    with data.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([r["text"], r["label"]] for r in rows)
    result = evaluate(
        trained.model_dir,
        DataSpec(path=data, text_column="text", label_column="label"),
        device="cpu",
        batch_size=4,
    )
    served = load_classifier(trained.model_dir, device="cpu").predict([r["text"] for r in rows])
    assert [p["predicted"] for p in result.predictions] == [p["label"] for p in served]
    assert result.accuracy == trained.metrics["val_accuracy"]
    assert result.device == "cpu" and result.peak_memory_bytes > 80_000_000
