"""Evaluating an embedding model on a golden retrieval set: ranking quality and speed.

What the ``embedding`` promotion gates read. :func:`evaluate_retrieval` embeds a golden
set's knowledge base with the document encoder and each distinct query with the query
encoder, ranks every document for every query by brute force, and measures the rankings
with :mod:`worker.retrieval` (the one definition of every retrieval metric, shared with
training's validation, the warm-up checks and the benchmarks).

Definitions, fixed here so that every evaluation means the same thing:

- **queries**: the pairs file's distinct query texts, in order of first appearance. A
  query's **relevant set** is every ``document_id`` paired with that same text; its
  **expected** document the first of them in the file.
- **rankings**: the best ``RANK_DEPTH`` (20) documents of each query (ties to the lower
  index in the knowledge base), enough for the metrics (@10) and the recall@k curve
  (k = 1..20). A query's **first hit** is the 1-based rank of its first relevant document
  within those, None when none is.
- **wrong**: a query whose first-ranked document is not relevant (first hit not 1).
- **latency**: wall time of one ``encode`` call of a batch of ``batch_size`` queries (the
  tokeniser included: it is what a search request pays), after one untimed warm-up call;
  p50/p95 as :func:`worker.evaluation.percentile`. The documents' encoding is timed whole.
- **documents** are embedded as the model says (``Embedder.document_text``: the body, or
  the title and the body), as its training and its deployment's index embed them.
- **warm-up**: the first ``warmup_queries`` queries with their embeddings and top ``k``
  results, and the first ``warmup_documents`` documents with theirs: what a deployment must
  reproduce (cosine >= 1 - 1e-4, same ids) before it takes traffic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from worker import retrieval

RANK_DEPTH = 20  # the curve's k range and more than the metrics' @10
CURVE_K = 20


class EmbedderLike(Protocol):
    """What is measured: :class:`worker.embeddings.Embedder` (or the un-tuned base)."""

    @property
    def max_length(self) -> int: ...

    def encode(
        self, texts: list[str], *, role: str = "query", batch_size: int = 64
    ) -> np.ndarray: ...


class PairLike(Protocol):
    @property
    def query(self) -> str: ...
    @property
    def document_id(self) -> str: ...


class DocumentLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def title(self) -> str: ...


@dataclass
class QueryResult:
    """One distinct query: its expected document, every relevant one, what was ranked."""

    query: str
    document_id: str  # the expected document (its first pair in the file)
    relevant: list[str]
    ids: list[str]  # the top ``k``, best first
    scores: list[float]
    first_hit: int | None  # 1-based, within RANK_DEPTH; None: not found

    @property
    def wrong(self) -> bool:
        return self.first_hit != 1


@dataclass
class RetrievalResult:
    """One embedding model evaluated on one retrieval set (definitions: module docstring)."""

    metrics: dict[str, float]  # worker.retrieval.metrics' keys
    curve: list[float]  # recall@k for k = 1..CURVE_K
    queries: list[QueryResult]
    pairs: int
    documents: int
    k: int
    batch_size: int
    latency_ms_p50: float
    latency_ms_p95: float
    documents_encode_seconds: float
    dim: int
    max_length: int
    device: str
    # Warm-up material: [{query, embedding, document_ids, scores}], [{id, text, embedding}].
    warmup_queries: list[dict[str, Any]] = field(default_factory=list)
    warmup_documents: list[dict[str, Any]] = field(default_factory=list)
    query_embeddings_sha256: str = ""
    document_embeddings_sha256: str = ""

    @property
    def wrong(self) -> list[QueryResult]:
        return [q for q in self.queries if q.wrong]

    def summary(self) -> dict[str, Any]:
        """The numbers an evaluation stores and gates read (no customer text)."""
        return {
            "task": "retrieval",
            **self.metrics,
            "recall_curve": list(self.curve),
            "queries": len(self.queries),
            "pairs": self.pairs,
            "documents": self.documents,
            "wrong_queries": len(self.wrong),
            "k": self.k,
            "batch_size": self.batch_size,
            "latency_ms_p50": self.latency_ms_p50,
            "latency_ms_p95": self.latency_ms_p95,
            "documents_encode_seconds": self.documents_encode_seconds,
            "dim": self.dim,
            "max_length": self.max_length,
            "device": self.device,
            "query_embeddings_sha256": self.query_embeddings_sha256,
            "document_embeddings_sha256": self.document_embeddings_sha256,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def group_queries(pairs: Sequence[PairLike], document_ids: set[str]) -> list[tuple[str, list[str]]]:
    """Distinct queries in order of first appearance, each with its relevant document ids
    (file order, no repeats). A pair naming a document the set lacks is a ValueError."""
    relevant: dict[str, list[str]] = {}
    for line, pair in enumerate(pairs, start=1):
        if pair.document_id not in document_ids:
            raise ValueError(
                f"pair {line} names document {pair.document_id!r}, which the documents lack"
            )
        wanted = relevant.setdefault(pair.query, [])
        if pair.document_id not in wanted:
            wanted.append(pair.document_id)
    return list(relevant.items())


def evaluate_retrieval(
    embedder: EmbedderLike,
    pairs: Sequence[PairLike],
    documents: Sequence[DocumentLike],
    *,
    k: int = 10,
    batch_size: int = 32,
    warmup_queries: int = 8,
    warmup_documents: int = 4,
) -> RetrievalResult:
    """Measure ``embedder`` on the golden ``pairs`` against their own ``documents``."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not documents:
        raise ValueError("nothing to search: no documents")
    ids = [d.id for d in documents]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate document ids")
    grouped = group_queries(pairs, set(ids))
    if not grouped:
        raise ValueError("nothing to evaluate: no pairs")
    texts = [query for query, _ in grouped]
    relevant = [set(wanted) for _, wanted in grouped]

    # Warm-up: the first call's allocations and kernel choices are not a batch's latency.
    embedder.encode(texts[:batch_size], role="query", batch_size=batch_size)
    started = time.perf_counter()
    # The model says how a document becomes text (body alone, or title and body), as its
    # training and its deployment's index embed it.
    compose = getattr(embedder, "document_text", None)
    document_texts = [compose(d) if callable(compose) else d.text for d in documents]
    document_vectors = _encode(embedder, document_texts, "document", batch_size)
    documents_seconds = time.perf_counter() - started
    latencies: list[float] = []
    blocks = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        began = time.perf_counter()
        blocks.append(_check(embedder.encode(batch, role="query", batch_size=batch_size), batch))
        latencies.append(time.perf_counter() - began)
    query_vectors = np.concatenate(blocks, axis=0)

    depth = max(RANK_DEPTH, k, retrieval.MRR_K, retrieval.NDCG_K)
    rankings = retrieval.search(query_vectors, document_vectors, ids, depth)
    ranked = [r.ids for r in rankings]
    results = [
        QueryResult(
            query=query,
            document_id=wanted[0],
            relevant=list(wanted),
            ids=r.ids[:k],
            scores=r.scores[:k],
            first_hit=retrieval.first_hit(r.ids, set(wanted)),
        )
        for (query, wanted), r in zip(grouped, rankings, strict=True)
    ]
    from worker.evaluation import percentile

    return RetrievalResult(
        metrics=retrieval.metrics(ranked, relevant),
        curve=retrieval.recall_curve(ranked, relevant, max_k=CURVE_K),
        queries=results,
        pairs=len(pairs),
        documents=len(documents),
        k=k,
        batch_size=batch_size,
        latency_ms_p50=percentile(latencies, 50) * 1000,
        latency_ms_p95=percentile(latencies, 95) * 1000,
        documents_encode_seconds=documents_seconds,
        dim=int(query_vectors.shape[1]),
        max_length=int(embedder.max_length),
        device=str(getattr(embedder, "device", "cpu")),
        warmup_queries=[
            {
                "query": q.query,
                "embedding": [float(x) for x in query_vectors[i]],
                "document_ids": q.ids,
                "scores": q.scores,
            }
            for i, q in enumerate(results[:warmup_queries])
        ],
        warmup_documents=[
            {
                "id": d.id,
                "title": d.title,
                "text": d.text,
                "embedding": [float(x) for x in document_vectors[i]],
            }
            for i, d in enumerate(documents[:warmup_documents])
        ],
        query_embeddings_sha256=_digest(query_vectors),
        document_embeddings_sha256=_digest(document_vectors),
    )


def _encode(embedder: EmbedderLike, texts: list[str], role: str, batch_size: int) -> np.ndarray:
    blocks = [
        _check(
            embedder.encode(texts[start : start + batch_size], role=role, batch_size=batch_size),
            texts[start : start + batch_size],
        )
        for start in range(0, len(texts), batch_size)
    ]
    return np.concatenate(blocks, axis=0)


def _check(vectors: np.ndarray, texts: list[str]) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != len(texts):
        raise ValueError(f"the embedder returned {array.shape} for {len(texts)} texts")
    return array


def _digest(vectors: np.ndarray) -> str:
    """sha256 of the float32 rows (C order): equal only on the same host and device; the
    warm-up compares vectors by cosine, this tells a reader whether two runs match bit for
    bit."""
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()
