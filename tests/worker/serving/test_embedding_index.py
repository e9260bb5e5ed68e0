"""Embedding serving without Ray: the index artifact (built with the document encoder,
bound by sha256), search equal to a brute-force numpy search over the same embeddings,
loading an embedding artifact the way a replica does, and the request socket's ``op``
frames beside the classifier's unchanged predict frame."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.worker.serving.embedding_models import (
    PackedEmbedder,
    stackfaq_documents,
    stackfaq_queries,
    tiny_embedder,
)
from tests.worker.serving.test_fastpath import Running
from worker.embeddings import load_embedder
from worker.serving.embedding import (
    REFERENCE_K,
    EmbeddingModel,
    build_index,
    read_index,
    search_index,
)
from worker.serving.fastpath import BadRequest, FastClient, FastServer, encode
from worker.serving.loading import load_model
from worker.serving.routing import IndexNotHere
from worker.serving.specs import ModelLoadError


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> PackedEmbedder:
    return tiny_embedder(tmp_path_factory.mktemp("embedder"), seed=7, separate=True)


def brute_force(queries: np.ndarray, documents: np.ndarray, k: int) -> list[list[int]]:
    scores = queries.astype(np.float64) @ documents.astype(np.float64).T
    return [sorted(range(len(row)), key=lambda i: (-row[i], i))[:k] for row in scores]


def test_search_equals_a_brute_force_numpy_search_over_the_same_embeddings(
    packed: PackedEmbedder,
) -> None:
    embedder = load_embedder(packed.model_dir)
    documents = stackfaq_documents(24)
    queries = stackfaq_queries(documents, 12)
    data = build_index(embedder, documents, queries=queries[:4])
    index = read_index(data, hashlib.sha256(data).hexdigest())
    assert index.ids == [d.id for d in documents]
    assert index.titles == [d.title for d in documents]
    texts = [f"{d.title}\n{d.text}" for d in documents]  # the model's document_fields
    expected = embedder.encode(texts, role="document")
    np.testing.assert_allclose(index.vectors, expected, atol=1e-6)

    query_vectors = embedder.encode(queries, role="query")
    ranked = search_index(index, query_vectors, 5)
    for row, order in zip(ranked, brute_force(query_vectors, expected, 5), strict=True):
        assert [r["document_id"] for r in row] == [documents[i].id for i in order]
        assert [r["title"] for r in row] == [documents[i].title for i in order]
    for row, vector in zip(ranked, query_vectors, strict=True):
        for result in row:
            position = index.ids.index(result["document_id"])
            assert result["score"] == pytest.approx(
                float(vector @ index.vectors[position]), abs=1e-6
            )
    # The reference the warm-up reads: the golden queries' vectors and top ids.
    assert index.reference.queries == queries[:4]
    np.testing.assert_allclose(index.reference.vectors, query_vectors[:4], atol=1e-6)
    for ids, order in zip(
        index.reference.ids, brute_force(query_vectors[:4], expected, REFERENCE_K), strict=True
    ):
        assert ids == [documents[i].id for i in order]
    assert index.reference.documents == texts[:5]


def test_an_index_whose_bytes_differ_from_its_sha256_is_refused(packed: PackedEmbedder) -> None:
    embedder = load_embedder(packed.model_dir)
    data = build_index(embedder, stackfaq_documents(3), queries=[])
    with pytest.raises(ModelLoadError, match="index sha256 mismatch"):
        read_index(data, "0" * 64)
    with pytest.raises(ModelLoadError, match="unreadable index"):
        bad = b"not an npz"
        read_index(bad, hashlib.sha256(bad).hexdigest())


def test_a_replica_loads_an_embedding_artifact_and_answers_both_roles(
    packed: PackedEmbedder,
) -> None:
    loaded = load_model(packed.tar.as_uri(), packed.sha256, device="cpu")
    model = loaded.classifier
    assert isinstance(model, EmbeddingModel)
    alone = load_embedder(packed.model_dir)
    texts = ["How do I delete my facebook account?", "strikethrough on github"]
    for role in ("query", "document"):
        np.testing.assert_allclose(
            model.embed(texts, role), alone.encode(texts, role=role), atol=1e-6
        )
    # Separate encoders: the roles differ.
    assert not np.allclose(model.embed(texts, "query"), model.embed(texts, "document"))
    with pytest.raises(ValueError, match="role"):
        model.embed(texts, "answer")
    with pytest.raises(IndexNotHere):
        model.search("anything", 3)
    data = build_index(alone, stackfaq_documents(6), queries=[])
    sha = hashlib.sha256(data).hexdigest()
    model.indexes[sha] = read_index(data, sha)
    model.current = sha
    results = model.search(texts[0], 3)
    assert len(results) == 3 and results[0]["document_id"] == "faq001"
    with pytest.raises(ValueError, match="k must be"):
        model.search(texts[0], 0)


def test_a_tampered_embedding_artifact_is_refused(packed: PackedEmbedder, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_model(packed.tar.as_uri(), "f" * 64, device="cpu")


async def _embed(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("role") not in ("query", "document"):
        raise ValueError("role must be 'query' or 'document'")
    return {"embeddings": [[1.0, 0.0]] * len(message["texts"]), "dim": 2, "replica_id": "r-1"}


async def _search(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("index") == "staged":
        raise IndexNotHere("index staged is not loaded here")
    return {"results": [{"document_id": "d1", "title": "t", "score": 0.5}], "index": "i"}


def test_op_frames_are_answered_beside_unchanged_predict_frames() -> None:
    # The predict frame is what it always was: no op key.
    assert encode({"model_id": "m", "texts": ["a"]}) == (
        b'\x00\x00\x00\x1e{"model_id":"m","texts":["a"]}'
    )
    running = Running()
    try:
        running.server.ops = {"embed": _embed, "search": _search}
        client = FastClient()
        assert client.call(running.endpoint, "m", ["hi"], timeout_s=5)["outputs"] == [
            [{"label": "HI", "score": 1.0}]
        ]
        reply = client.request(
            running.endpoint,
            {"op": "embed", "model_id": "m", "texts": ["a", "b"], "role": "query"},
            timeout_s=5,
        )
        assert reply["dim"] == 2 and len(reply["embeddings"]) == 2
        with pytest.raises(BadRequest, match="role"):
            client.request(
                running.endpoint,
                {"op": "embed", "model_id": "m", "texts": ["a"], "role": "x"},
                timeout_s=5,
            )
        found = client.request(
            running.endpoint, {"op": "search", "model_id": "m", "query": "q", "k": 1}, timeout_s=5
        )
        assert found["results"][0]["document_id"] == "d1"
        with pytest.raises(IndexNotHere):
            client.request(
                running.endpoint,
                {"op": "search", "model_id": "m", "query": "q", "k": 1, "index": "staged"},
                timeout_s=5,
            )
        with pytest.raises(BadRequest, match="unknown op"):
            client.request(running.endpoint, {"op": "train", "model_id": "m"}, timeout_s=5)
        assert client.call(running.endpoint, "m", ["ok"], timeout_s=5)["outputs"]  # still usable
        client.close()
    finally:
        running.stop()


def test_a_server_without_ops_refuses_them() -> None:
    async def predict(model_id: str, texts: list[str]) -> dict[str, Any]:
        return {"outputs": [], "replica_id": "r"}

    server = FastServer(predict, replica_id="r")
    answer = asyncio.run(server._answer({"op": "embed", "model_id": "m"}))
    assert answer["error"] == "bad_request"
