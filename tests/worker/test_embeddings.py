"""Embedding models on the shared MiniLM: encode's shape, norms and roles; a saved model
loads back to the same vectors; a model for other base weights is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from worker import base_models, embeddings
from worker.adapters import AdapterError, base_tokenizer
from worker.embeddings import TrainableEmbedder, base_embedder, load_embedder
from worker.footprint import measure_memory_bytes
from worker.modeling import artifact_format, collate, encode

LORA = {
    "lora_r": 4,
    "lora_alpha": 8.0,
    "lora_dropout": 0.0,
    "lora_target_modules": ["query", "value"],
}
TEXTS = ["How do I reset my password?", "Strikethrough in markdown", "a third, longer text " * 5]


def _perturbed(separate: bool) -> TrainableEmbedder:
    """A model whose LoRA B factors are not zero (a fresh adapter is the base exactly)."""
    torch.manual_seed(3)
    model = TrainableEmbedder(
        base_model=base_models.MINILM_L6_EMBED, lora=LORA, max_length=32, separate=separate
    )
    with torch.no_grad():
        for role in model.roles():
            for name, tensor in model.encoder_tensors(role).items():
                if name.endswith("lora_B"):
                    tensor.normal_(0.0, 0.05)
    model.train(False)
    return model


@pytest.fixture(scope="module")
def separate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("embedder") / "model"
    _perturbed(separate=True).save(directory)
    return directory


def test_the_base_embedder_gives_normalised_float32_rows() -> None:
    embedder = base_embedder(max_length=32)
    vectors = embedder.encode(TEXTS)
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, embedder.dim) == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # One encoder: the roles agree; batching (sorted by length) does not change a row.
    np.testing.assert_allclose(embedder.encode(TEXTS, role="document"), vectors, atol=1e-6)
    np.testing.assert_allclose(embedder.encode(TEXTS, batch_size=1), vectors, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="role"):
        embedder.encode(TEXTS, role="answer")


def test_a_saved_model_loads_back_to_the_vectors_it_trained_with(separate_dir: Path) -> None:
    assert sorted(p.name for p in separate_dir.iterdir()) == [
        "document.safetensors",
        "embedder.json",
        "query.safetensors",
    ]
    meta = json.loads((separate_dir / "embedder.json").read_text())
    assert meta["kind"] == "embedding" and meta["separate"] is True
    assert meta["base_sha256"] == base_models.minilm_sha256()
    model = TrainableEmbedder.from_dir(separate_dir)
    model.train(False)
    tokenizer = base_tokenizer(base_models.MINILM_L6_EMBED, max_length=32)
    batch = collate(encode(tokenizer, TEXTS, 32), tokenizer.pad_token_id)
    loaded = load_embedder(separate_dir)
    assert loaded.separate and loaded.max_length == 32
    with torch.no_grad():
        for role in ("query", "document"):
            trained = model(**batch, role=role).numpy()
            np.testing.assert_allclose(loaded.encode(TEXTS, role=role), trained, atol=1e-5)
    # Two encoders: a text's query and document vectors differ, and differ from the base's.
    query, document = loaded.encode(TEXTS), loaded.encode(TEXTS, role="document")
    assert float(np.abs(query - document).max()) > 1e-3
    assert float(np.abs(query - base_embedder(max_length=32).encode(TEXTS)).max()) > 1e-3


def test_the_registry_sees_an_adapter_of_the_shared_base(separate_dir: Path) -> None:
    shape = artifact_format(separate_dir)
    assert shape["format"] == "adapter"
    assert shape["base_sha256"] == base_models.minilm_sha256()
    assert shape["base_memory_bytes"] > 80_000_000
    own = embeddings.embedder_bytes(separate_dir)
    assert measure_memory_bytes(separate_dir, ["hello"]) == own
    assert 0 < own < 1_000_000


def test_a_model_for_other_base_weights_is_refused(separate_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for path in separate_dir.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    meta = json.loads((other / "embedder.json").read_text())
    (other / "embedder.json").write_text(json.dumps({**meta, "base_sha256": "0" * 64}))
    with pytest.raises(AdapterError, match="sha256"):
        load_embedder(other)
    (other / "query.safetensors").unlink()
    (other / "embedder.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="lacks"):
        load_embedder(other)


def test_documents_are_embedded_as_the_model_says() -> None:
    assert embeddings.document_text("body", "Title", "title_text") == "Title\nbody"
    assert embeddings.document_text("body", "", "title_text") == "body"
    assert embeddings.document_text("body", "Title", "text") == "body"
    with pytest.raises(ValueError):
        embeddings.document_text("body", "Title", "summary")
