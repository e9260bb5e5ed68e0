"""The retrieval metrics and the brute-force search every part of the workbench reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker import retrieval


def _naive_rank(query: np.ndarray, documents: np.ndarray) -> list[int]:
    scores = [float(query @ d) for d in documents]
    return sorted(range(len(documents)), key=lambda i: (-scores[i], i))


def test_top_k_equals_a_naive_sort_including_ties() -> None:
    rng = np.random.default_rng(0)
    documents = retrieval.normalise(rng.normal(size=(300, 16)))
    documents[7] = documents[3]  # a tie: the lower index comes first
    queries = retrieval.normalise(rng.normal(size=(600, 16)))  # more than one CHUNK
    queries[0] = documents[3]
    indices, scores = retrieval.top_k(queries, documents, 10)
    for row, query in enumerate(queries):
        assert list(indices[row]) == _naive_rank(query, documents)[:10]
    assert list(indices[0][:2]) == [3, 7]
    assert scores[0][0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)


def test_k_beyond_the_documents_is_cut_and_shapes_must_match() -> None:
    documents = retrieval.normalise(np.eye(3))
    indices, _ = retrieval.top_k(documents, documents, 10)
    assert indices.shape == (3, 3)
    assert list(indices[1]) == [1, 0, 2]
    with pytest.raises(ValueError, match="differ"):
        retrieval.top_k(np.ones((1, 4), np.float32), documents, 1)


def test_metrics_by_hand() -> None:
    rankings = [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "x"], ["x", "y", "z"]]
    relevant = [{"a"}, {"a"}, {"b", "c"}, {"a"}]
    out = retrieval.metrics(rankings, relevant, ks=(1, 2))
    assert out["recall_at_1"] == pytest.approx(2 / 4)
    assert out["recall_at_2"] == pytest.approx(3 / 4)
    assert out["mrr_at_10"] == pytest.approx((1 + 1 / 2 + 1 + 0) / 4)
    ideal_two = 1 + 1 / math.log2(3)
    expected_ndcg = (1 + (1 / math.log2(3)) + ((1 + 1 / math.log2(3)) / ideal_two) + 0) / 4
    assert out["ndcg_at_10"] == pytest.approx(expected_ndcg)
    assert retrieval.recall_curve(rankings, relevant, max_k=3) == [0.5, 0.75, 0.75]


def test_metrics_refuse_what_cannot_be_measured() -> None:
    with pytest.raises(ValueError, match="no queries"):
        retrieval.metrics([], [])
    with pytest.raises(ValueError, match="without a relevant"):
        retrieval.metrics([["a"]], [set()])
    with pytest.raises(ValueError, match="rankings for"):
        retrieval.metrics([["a"]], [{"a"}, {"b"}])
