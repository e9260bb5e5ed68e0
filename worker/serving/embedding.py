"""Embedding models on a replica: an embedder and the indexes of its knowledge bases.

An embedding deployment serves two requests (:mod:`worker.serving.fastpath`'s ``op``):
``embed`` (texts -> L2-normalised vectors with the query or the document encoder) and
``search`` (a query -> the ``k`` best documents of the deployment's index, by
:func:`worker.retrieval.top_k`: brute force over the index's vectors, so a search equals a
numpy search over the same embeddings by construction).

An index is an artifact of its own (``.npz``, no pickle), bound by its sha256 like a model:
``ids`` and ``titles`` (unicode arrays) and ``vectors`` (float32, (documents, dim), the
document encoder's), and the warm-up's reference computed in-process from the version's
artifact when the index was built: ``ref_queries``, their query embeddings
``ref_vectors`` and their top-``REFERENCE_K`` ids ``ref_ids`` ("" past the last document),
and ``ref_documents``, the texts the first documents were embedded as (their vectors are
the index's first rows).
A replica may hold two indexes of a model at once: the one it serves and a staged one being
verified (a reindex, blue/green); a search names the staged one to verify it.

Light: numpy and the retrieval module only (the fleet controller reads an index's reference
here without torch); the embedder itself comes from :mod:`worker.embeddings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from worker.retrieval import top_k
from worker.serving.routing import IndexNotHere
from worker.serving.specs import ModelLoadError

ROLES = ("query", "document")
# Ranked ids the warm-up's reference keeps per golden query.
REFERENCE_K = 10
# Documents whose embedding the warm-up checks against the index's own vectors.
REFERENCE_DOCUMENTS = 5
# A search asks for at most this many documents (the REST API's bound too).
MAX_K = 100
INDEX_MEMBERS = ("ids", "titles", "vectors")


class EmbedderLike(Protocol):
    """What :class:`worker.embeddings.Embedder` offers the replica."""

    dim: int

    def encode(
        self, texts: list[str], *, role: str = "query", batch_size: int = 64
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class Reference:
    """The warm-up's golden queries with what the version's own artifact answered."""

    queries: list[str]
    vectors: np.ndarray  # (queries, dim) float32, query role
    ids: list[list[str]]  # top-REFERENCE_K document ids per query, best first
    # The texts the first documents were embedded as (their vectors: the index's first rows).
    documents: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Index:
    sha256: str
    ids: list[str]
    titles: list[str]
    vectors: np.ndarray  # (documents, dim) float32, L2-normalised
    reference: Reference

    @property
    def memory_bytes(self) -> int:
        strings = sum(len(i) + len(t) for i, t in zip(self.ids, self.titles, strict=True))
        return int(self.vectors.nbytes) + strings


def index_bytes(
    *,
    ids: Sequence[str],
    titles: Sequence[str],
    vectors: np.ndarray,
    reference: Reference,
) -> bytes:
    """The index artifact's bytes (see the module docstring)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids) or len(ids) != len(titles):
        raise ValueError("one vector, id and title per document")
    width = REFERENCE_K
    ref_ids = np.array(
        [list(row[:width]) + [""] * (width - len(row[:width])) for row in reference.ids],
        dtype=str,
    ).reshape(len(reference.ids), width)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        ids=np.array(list(ids), dtype=str),
        titles=np.array(list(titles), dtype=str),
        vectors=vectors,
        ref_queries=np.array(reference.queries, dtype=str),
        ref_vectors=np.ascontiguousarray(reference.vectors, dtype=np.float32).reshape(
            len(reference.queries), vectors.shape[1]
        ),
        ref_ids=ref_ids,
        ref_documents=np.array(reference.documents, dtype=str),
    )
    return buffer.getvalue()


class DocumentLike(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def title(self) -> str: ...


def build_index(
    embedder: EmbedderLike, documents: Sequence[DocumentLike], *, queries: Sequence[str]
) -> bytes:
    """Embed the documents with the document encoder (as the model embeds documents:
    ``document_text``) and the golden ``queries`` with the query encoder, searched over them
    for the reference; the index artifact's bytes."""
    as_text = getattr(embedder, "document_text", None)
    texts = [as_text(d) if as_text is not None else d.text for d in documents]
    vectors = embedder.encode(texts, role="document")
    query_vectors = (
        embedder.encode(list(queries), role="query")
        if queries
        else np.zeros((0, vectors.shape[1]), dtype=np.float32)
    )
    ranked, _ = top_k(query_vectors, vectors, REFERENCE_K)
    ids = [d.id for d in documents]
    reference = Reference(
        queries=list(queries),
        vectors=query_vectors,
        ids=[[ids[int(i)] for i in row] for row in ranked],
        documents=texts[:REFERENCE_DOCUMENTS],
    )
    return index_bytes(
        ids=ids, titles=[d.title for d in documents], vectors=vectors, reference=reference
    )


def read_index(data: bytes, sha256: str) -> Index:
    """The index in ``data``, refused (ModelLoadError) unless its sha256 is ``sha256``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.lower():
        raise ModelLoadError(f"index sha256 mismatch: expected {sha256}, got {actual}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        vectors = np.ascontiguousarray(arrays["vectors"], dtype=np.float32)
        ids = [str(i) for i in arrays["ids"].tolist()]
        titles = [str(t) for t in arrays["titles"].tolist()]
        ref_ids = [[str(i) for i in row if str(i)] for row in arrays["ref_ids"].tolist()]
        reference = Reference(
            queries=[str(q) for q in arrays["ref_queries"].tolist()],
            vectors=np.asarray(arrays["ref_vectors"], dtype=np.float32),
            ids=ref_ids,
            documents=[str(t) for t in arrays["ref_documents"].tolist()],
        )
    except (KeyError, ValueError, OSError) as error:
        raise ModelLoadError(f"unreadable index: {error}") from error
    if vectors.ndim != 2 or vectors.shape[0] != len(ids) or len(ids) != len(titles):
        raise ModelLoadError("index: one vector, id and title per document")
    return Index(sha256=actual, ids=ids, titles=titles, vectors=vectors, reference=reference)


def search_index(index: Index, query_vectors: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """Each query's ``k`` best documents of ``index`` as the API answers them."""
    ranked, scores = top_k(np.asarray(query_vectors, dtype=np.float32), index.vectors, k)
    return [
        [
            {
                "document_id": index.ids[int(i)],
                "title": index.titles[int(i)],
                "score": float(s),
            }
            for i, s in zip(row, row_scores, strict=True)
        ]
        for row, row_scores in zip(ranked, scores, strict=True)
    ]


def check_k(k: int) -> int:
    if not 1 <= int(k) <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}")
    return int(k)


def check_role(role: object) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be 'query' or 'document', not {role!r}")
    return str(role)


class EmbeddingModel:
    """A served embedding model: its embedder and the indexes the replica holds for it
    (``current``: the one searches use unless they name another)."""

    def __init__(self, embedder: EmbedderLike, *, weight_bytes: int) -> None:
        self.embedder = embedder
        self.model_bytes = weight_bytes
        self.indexes: dict[str, Index] = {}
        self.current = ""

    @property
    def weight_bytes(self) -> int:
        return self.model_bytes + sum(index.memory_bytes for index in self.indexes.values())

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    def embed(self, texts: list[str], role: str) -> np.ndarray:
        return self.embedder.encode(list(texts), role=check_role(role))

    def index(self, name: str = "") -> Index:
        """The index ``name`` (a sha256), or the served one; IndexNotHere if not held."""
        chosen = self.indexes.get(name or self.current)
        if chosen is None:
            raise IndexNotHere(f"index {name or self.current or '(none)'} is not loaded here")
        return chosen

    def search(self, query: str, k: int, index: str = "") -> list[dict[str, Any]]:
        chosen = self.index(index)
        vectors = self.embedder.encode([query], role="query")
        return search_index(chosen, vectors, check_k(k))[0]
