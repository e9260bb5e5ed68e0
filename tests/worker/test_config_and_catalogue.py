"""Training config checks and the base-model catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import autocomplete, base_models
from worker.training.config import DataSpec, TrainConfig


def test_defaults_are_valid_and_round_trip() -> None:
    config = TrainConfig(base_model="minilm-l6", patience=2)
    assert config.validate() == {}
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_out_of_range_values_are_named_field_by_field() -> None:
    config = TrainConfig(
        base_model="gpt-17",
        epochs=0,
        learning_rate=0.0,
        batch_size=2048,
        max_length=4,
        patience=0,
        validation_split=0.6,
        checkpoint_every_steps=0,
    )
    assert set(config.validate()) == {
        "base_model",
        "epochs",
        "learning_rate",
        "batch_size",
        "max_length",
        "patience",
        "validation_split",
        "checkpoint_every_steps",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 101),
        ("epochs", 2.5),
        ("learning_rate", 1.5),
        ("batch_size", 0),
        ("max_length", 513),
        ("patience", 51),
        ("validation_split", 0.0),
        ("epochs", True),
        ("checkpoint_min_seconds", -1.0),
        ("checkpoint_min_seconds", 86_401),
    ],
)
def test_each_bound_is_checked(field: str, value: object) -> None:
    config = TrainConfig(base_model="tiny-bert", **{field: value})
    assert field in config.validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 100), ("learning_rate", 1.0), ("max_length", 8), ("validation_split", 0.5)],
)
def test_bounds_are_inclusive(field: str, value: object) -> None:
    assert TrainConfig(base_model="tiny-bert", **{field: value}).validate() == {}


def test_unknown_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig.from_dict({"base_model": "tiny-bert", "dropout": 0.3})


def test_data_spec_round_trips_through_json_types() -> None:
    spec = DataSpec(Path("/data/train.jsonl"), "text", "label", "jsonl")
    assert spec.to_dict()["path"] == "/data/train.jsonl"
    assert DataSpec.from_dict(spec.to_dict()) == spec


def test_catalogue_lists_the_full_and_the_adapter_base_models() -> None:
    models = {model.id: model for model in base_models.catalogue()}
    assert set(models) == {
        "tiny-bert", "minilm-l6", "minilm-l6-lora", "minilm-l6-embed", "tiny-gpt2"
    }  # fmt: skip
    assert all(model.name for model in models.values())
    assert {m.id: m.kind for m in models.values()} == {
        "tiny-bert": "classifier",
        "minilm-l6": "classifier",
        "minilm-l6-lora": "classifier",
        "minilm-l6-embed": "embedding",
        "tiny-gpt2": "autocomplete",
    }
    assert {m.id: m.format for m in models.values()} == {
        "tiny-bert": "full",
        "minilm-l6": "full",
        "minilm-l6-lora": "adapter",
        "minilm-l6-embed": "adapter",
        "tiny-gpt2": "full",
    }
    # The embedding entry adapts the very weights the classifier adapters do: one base.
    embed = models["minilm-l6-embed"]
    assert embed.base == models["minilm-l6-lora"].base
    assert base_models.base_sha256("minilm-l6-embed") == base_models.base_sha256("minilm-l6-lora")
    assert base_models.size_bytes("minilm-l6-embed") == base_models.size_bytes("minilm-l6-lora")
    adapter = models["minilm-l6-lora"]
    assert adapter.base == "all-MiniLM-L6-v2"
    assert base_models.base_sha256("minilm-l6-lora") == base_models.minilm_sha256()
    assert base_models.base_sha256("minilm-l6") is None
    # The weights are installed here, so a run that names no base gets the adapter.
    assert base_models.default_base_model() == "minilm-l6-lora"
    assert adapter.defaults()["lora_target_modules"] == ["query", "value"]
    with pytest.raises(base_models.UnknownBaseModel):
        base_models.get("gpt-17")
    # The tiny GPT-2 needs no files; its size is counted from its shape, as built.
    assert base_models.installed("tiny-gpt2") and base_models.base_sha256("tiny-gpt2") is None
    assert base_models.size_bytes("tiny-gpt2") == 4 * sum(
        p.numel()
        for p in autocomplete.build_model(
            autocomplete.gpt2_config(base_models.TINY_GPT2_VOCAB_SIZE)
        ).parameters()
    )


def test_size_bytes_of_the_tiny_bert_is_its_parameters_in_float32() -> None:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(
        base_models.tiny_bert_config(vocab_size=base_models.TINY_BERT_VOCAB_SIZE, num_labels=2)
    )
    assert base_models.size_bytes("tiny-bert") == 4 * sum(p.numel() for p in model.parameters())
    assert 1_000_000 < base_models.size_bytes("tiny-bert") < 10_000_000


def test_size_bytes_of_minilm_is_its_safetensors_file() -> None:
    weights = base_models.minilm_path() / "model.safetensors"
    assert base_models.size_bytes("minilm-l6") == weights.stat().st_size > 80_000_000


def test_embedding_parameters_are_for_embedding_base_models_only() -> None:
    assert TrainConfig(base_model="minilm-l6-embed", separate_encoders=True).validate() == {}
    errors = TrainConfig(base_model="minilm-l6-lora", separate_encoders=True).validate()
    assert "separate_encoders" in errors
    assert (
        "document_fields" in TrainConfig(base_model="tiny-bert", document_fields="text").validate()
    )
    bad = TrainConfig(base_model="minilm-l6-embed", document_fields="summary").validate()
    assert "document_fields" in bad
    assert TrainConfig(base_model="minilm-l6-embed").resolved_document_fields() == "title_text"
