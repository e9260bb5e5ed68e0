"""Retrieval by embeddings: brute-force top-k search and the ranking metrics.

One definition of each metric, used by training's validation, the evaluation of golden
retrieval sets, the deployment's warm-up check and the benchmarks, so the figures they
report are comparable:

* ``recall_at_k``: the share of queries with at least one relevant document among the
  first ``k`` results (StackFAQ has one relevant document per query, where this is the
  hit rate);
* ``mrr_at_10``: the mean over queries of 1 / rank of the first relevant document within
  the first 10 (0 when none is);
* ``ndcg_at_10``: binary-relevance nDCG over the first 10, ideal DCG from the query's own
  number of relevant documents.

Vectors are L2-normalised float32 rows, so a dot product is the cosine similarity. Ties
are broken by the document's position in the index (the lower first), so a ranking is a
pure function of the vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

KS = (1, 5, 10)
MRR_K = 10
NDCG_K = 10
# Queries scored per matrix product: bounds the score block to ~CHUNK x documents floats.
CHUNK = 256


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), as float32."""
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


def top_k(queries: np.ndarray, documents: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best documents of each query: (indices, scores), each (queries, k), best
    first. ``k`` larger than the documents is cut to their number."""
    if queries.ndim != 2 or documents.ndim != 2 or queries.shape[1] != documents.shape[1]:
        raise ValueError(
            f"query vectors {queries.shape} and document vectors {documents.shape} differ"
        )
    n_docs = documents.shape[0]
    k = max(0, min(k, n_docs))
    indices = np.zeros((queries.shape[0], k), dtype=np.int64)
    scores = np.zeros((queries.shape[0], k), dtype=np.float32)
    if k == 0:
        return indices, scores
    for start in range(0, queries.shape[0], CHUNK):
        block = queries[start : start + CHUNK] @ documents.T
        part = _best_k(block, k)
        part_scores = np.take_along_axis(block, part, axis=1)
        # Best first; equal scores by index (lexsort's last key is the primary one).
        order = np.lexsort((part, -part_scores), axis=1)
        indices[start : start + CHUNK] = np.take_along_axis(part, order, axis=1)
        scores[start : start + CHUNK] = np.take_along_axis(part_scores, order, axis=1)
    return indices, scores


def _best_k(block: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` highest columns, unordered; of columns tied at the k-th score the
    lowest ones (argpartition alone would pick any of them)."""
    rows, n_docs = block.shape
    if k >= n_docs:
        return np.tile(np.arange(n_docs), (rows, 1))
    kth = -np.partition(-block, k - 1, axis=1)[:, k - 1 : k]
    taken = block >= kth
    counts = taken.sum(axis=1)
    if np.all(counts == k):  # no tie at the boundary: nonzero lists each row's k in order
        return np.nonzero(taken)[1].reshape(rows, k)
    part = np.empty((rows, k), dtype=np.int64)
    for row in range(rows):
        candidates = np.flatnonzero(taken[row])
        order = np.lexsort((candidates, -block[row, candidates]))[:k]
        part[row] = candidates[order]
    return part


@dataclass(frozen=True)
class Ranked:
    """One query's results: document ids best first, and their scores."""

    ids: list[str]
    scores: list[float]


def search(
    queries: np.ndarray, documents: np.ndarray, document_ids: Sequence[str], k: int
) -> list[Ranked]:
    """Top-``k`` document ids and scores per query."""
    indices, scores = top_k(queries, documents, k)
    return [
        Ranked(ids=[document_ids[i] for i in row], scores=[float(s) for s in row_scores])
        for row, row_scores in zip(indices, scores, strict=True)
    ]


def first_hit(ranked: Sequence[str], relevant: set[str]) -> int | None:
    """1-based rank of the first relevant id, or None."""
    for position, document_id in enumerate(ranked, start=1):
        if document_id in relevant:
            return position
    return None


def metrics(
    ranked: Iterable[Sequence[str]], relevant: Sequence[set[str]], ks: Sequence[int] = KS
) -> dict[str, float]:
    """recall_at_{k} for each k, mrr_at_10 and ndcg_at_10 over the queries, in [0, 1].

    ``ranked[i]`` is query i's ranking (at least max(ks, 10) long where the index is),
    ``relevant[i]`` its relevant document ids (at least one)."""
    rankings = [list(r) for r in ranked]
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} queries")
    if not rankings:
        raise ValueError("no queries to measure")
    hits = {k: 0 for k in ks}
    reciprocal = 0.0
    ndcg = 0.0
    for ranking, wanted in zip(rankings, relevant, strict=True):
        if not wanted:
            raise ValueError("a query without a relevant document")
        first = first_hit(ranking, wanted)
        for k in ks:
            if first is not None and first <= k:
                hits[k] += 1
        if first is not None and first <= MRR_K:
            reciprocal += 1.0 / first
        dcg = sum(
            1.0 / math.log2(position + 1)
            for position, document_id in enumerate(ranking[:NDCG_K], start=1)
            if document_id in wanted
        )
        ideal = sum(1.0 / math.log2(p + 1) for p in range(1, min(len(wanted), NDCG_K) + 1))
        ndcg += dcg / ideal
    n = len(rankings)
    out = {f"recall_at_{k}": hits[k] / n for k in ks}
    out[f"mrr_at_{MRR_K}"] = reciprocal / n
    out[f"ndcg_at_{NDCG_K}"] = ndcg / n
    return out


def recall_curve(
    ranked: Iterable[Sequence[str]], relevant: Sequence[set[str]], max_k: int = 20
) -> list[float]:
    """recall@k for k = 1 .. max_k (the review page's curve)."""
    rankings = [list(r) for r in ranked]
    counts = [0] * (max_k + 1)
    for ranking, wanted in zip(rankings, relevant, strict=True):
        first = first_hit(ranking[:max_k], wanted)
        if first is not None:
            counts[first] += 1
    curve, total = [], 0
    for k in range(1, max_k + 1):
        total += counts[k]
        curve.append(total / max(1, len(rankings)))
    return curve
