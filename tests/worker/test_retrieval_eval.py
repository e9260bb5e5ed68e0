"""The retrieval evaluation's numbers against a brute-force computation written out here.

The metric plumbing is checked with ``HashingEmbedderStandIn``, a deterministic bag-of-words
stand-in for :class:`worker.embeddings.Embedder` (no model weights: these are tests of what
the evaluation computes from vectors, not of an encoder). The real embedder is measured on
a worker in ``tests/test_evaluation_retrieval.py``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from worker.retrieval_eval import evaluate_retrieval, group_queries

STACKFAQ = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "stackfaq"


@dataclass(frozen=True)
class Pair:
    query: str
    document_id: str


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""


class HashingEmbedderStandIn:
    """A stand-in for the Embedder: each word hashed into one of ``dim`` buckets, the counts
    (plus a little noise) L2-normalised; documents and queries share the encoder. Records
    its calls."""

    max_length = 32
    dim = 256
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def encode(self, texts: list[str], *, role: str = "query", batch_size: int = 64) -> np.ndarray:
        if role not in ("query", "document"):
            raise ValueError(role)
        self.calls.append((role, len(texts)))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dim] += 1.0
            # A little noise seeded by the text: no two documents tie exactly, so the ranking
            # does not hang on float rounding.
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            out[row] += 0.05 * np.random.default_rng(seed).normal(size=self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def stackfaq_slice(documents: int = 30) -> tuple[list[Pair], list[Document]]:
    """The first ``documents`` StackFAQ documents and every test pair naming them."""
    with (STACKFAQ / "documents.csv").open(encoding="utf-8", newline="") as fh:
        docs = [Document(r["id"], r["text"], r["title"]) for r in csv.DictReader(fh)][:documents]
    keep = {d.id for d in docs}
    with (STACKFAQ / "test.csv").open(encoding="utf-8", newline="") as fh:
        pairs = [Pair(r["query"], r["document_id"]) for r in csv.DictReader(fh)]
    return [p for p in pairs if p.document_id in keep], docs


def brute_force(
    embedder: HashingEmbedderStandIn, pairs: list[Pair], docs: list[Document]
) -> tuple[dict[str, float], list[float], list[list[str]]]:
    """Every query scored against every document one by one, ranked by (-score, position),
    and the metrics counted by hand."""
    relevant: dict[str, set[str]] = {}
    for p in pairs:
        relevant.setdefault(p.query, set()).add(p.document_id)
    doc_vectors = embedder.encode([d.text for d in docs], role="document")
    rankings = []
    for query in relevant:
        q = embedder.encode([query])[0]
        scores = [float(np.dot(q, v)) for v in doc_vectors]
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))
        rankings.append([docs[i].id for i in order])
    n = len(rankings)
    hits = {k: 0 for k in range(1, 21)}
    mrr = ndcg = 0.0
    for ranking, wanted in zip(rankings, relevant.values(), strict=True):
        ranks = [i + 1 for i, d in enumerate(ranking) if d in wanted]
        first = ranks[0] if ranks else None
        for k in hits:
            hits[k] += int(first is not None and first <= k)
        mrr += 1 / first if first is not None and first <= 10 else 0.0
        dcg = sum(1 / math.log2(r + 1) for r in ranks if r <= 10)
        ideal = sum(1 / math.log2(r + 1) for r in range(1, min(len(wanted), 10) + 1))
        ndcg += dcg / ideal
    metrics = {
        "recall_at_1": hits[1] / n,
        "recall_at_5": hits[5] / n,
        "recall_at_10": hits[10] / n,
        "mrr_at_10": mrr / n,
        "ndcg_at_10": ndcg / n,
    }
    return metrics, [hits[k] / n for k in range(1, 21)], rankings


def test_metrics_and_curve_equal_a_brute_force_computation() -> None:
    pairs, docs = stackfaq_slice()
    embedder = HashingEmbedderStandIn()
    result = evaluate_retrieval(embedder, pairs, docs, batch_size=16)
    metrics, curve, rankings = brute_force(HashingEmbedderStandIn(), pairs, docs)
    assert result.metrics == pytest.approx(metrics, abs=1e-12)
    assert result.curve == pytest.approx(curve, abs=1e-12)
    # Not trivially perfect nor useless: the slice tells rankings apart.
    assert 0.1 < result.metrics["recall_at_1"] < result.metrics["recall_at_10"] < 1
    assert len(result.queries) == len(rankings) == len({p.query for p in pairs})
    for query, ranking in zip(result.queries, rankings, strict=True):
        assert query.ids == ranking[:10]
        assert query.scores == sorted(query.scores, reverse=True)
        expected = next(i + 1 for i, d in enumerate(ranking) if d in query.relevant)
        assert query.first_hit == (expected if expected <= 20 else None)
    wrong = [q for q in result.queries if q.ids[0] not in q.relevant]
    assert [q.query for q in result.wrong] == [q.query for q in wrong]
    summary = result.summary()
    assert summary["wrong_queries"] == len(wrong)
    assert summary["recall_curve"] == result.curve
    assert summary["queries"] == len(rankings) and summary["documents"] == 30


def test_encoding_is_batched_by_role_and_timed_per_query_batch() -> None:
    pairs, docs = stackfaq_slice()
    embedder = HashingEmbedderStandIn()
    result = evaluate_retrieval(embedder, pairs, docs, batch_size=16)
    queries = len({p.query for p in pairs})
    # One untimed warm-up batch, the documents, then every query batch.
    assert embedder.calls[0] == ("query", 16)
    assert [n for role, n in embedder.calls if role == "document"] == [16, 14]
    assert sum(n for role, n in embedder.calls[1:] if role == "query") == queries
    assert 0 < result.latency_ms_p50 <= result.latency_ms_p95
    assert result.dim == 256 and result.max_length == 32


def test_warmup_material_is_the_first_queries_and_documents_with_their_vectors() -> None:
    pairs, docs = stackfaq_slice()
    embedder = HashingEmbedderStandIn()
    result = evaluate_retrieval(embedder, pairs, docs, warmup_queries=3, warmup_documents=2)
    assert [w["query"] for w in result.warmup_queries] == [q.query for q in result.queries[:3]]
    first = result.warmup_queries[0]
    assert np.allclose(first["embedding"], embedder.encode([first["query"]])[0], atol=1e-7)
    assert first["document_ids"] == result.queries[0].ids
    assert [d["id"] for d in result.warmup_documents] == [docs[0].id, docs[1].id]
    assert len(result.query_embeddings_sha256) == 64
    # Same vectors, same digests.
    again = evaluate_retrieval(HashingEmbedderStandIn(), pairs, docs)
    assert again.document_embeddings_sha256 == result.document_embeddings_sha256


def test_a_query_paired_with_several_documents_counts_each_as_relevant() -> None:
    docs = [Document("c", "blue sky"), Document("b", "green pears"), Document("a", "red apples")]
    pairs = [Pair("green pears", "b"), Pair("green pears", "a"), Pair("blue sky", "c")]
    result = evaluate_retrieval(HashingEmbedderStandIn(), pairs, docs)
    assert [q.query for q in result.queries] == ["green pears", "blue sky"]
    assert result.queries[0].document_id == "b" and result.queries[0].relevant == ["b", "a"]
    assert result.metrics["recall_at_1"] == 1.0
    # Ideal DCG counts both relevant documents, whatever rank the second one got.
    ranks = result.queries[0].ids
    assert ranks[0] == "b"
    ideal = 1 + 1 / math.log2(3)
    second = 1 / math.log2(ranks.index("a") + 2)
    assert result.metrics["ndcg_at_10"] == pytest.approx(((1 + second) / ideal + 1) / 2)


def test_bad_inputs_are_refused() -> None:
    docs = [Document("a", "x"), Document("b", "y")]
    with pytest.raises(ValueError, match="pair 2 names document 'z'"):
        group_queries([Pair("q", "a"), Pair("r", "z")], {"a", "b"})
    with pytest.raises(ValueError, match="no pairs"):
        evaluate_retrieval(HashingEmbedderStandIn(), [], docs)
    with pytest.raises(ValueError, match="no documents"):
        evaluate_retrieval(HashingEmbedderStandIn(), [Pair("q", "a")], [])
    with pytest.raises(ValueError, match="duplicate"):
        evaluate_retrieval(HashingEmbedderStandIn(), [Pair("q", "a")], [docs[0], docs[0]])
