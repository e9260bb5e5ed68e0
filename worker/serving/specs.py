"""What the workbench tells a serving backend, and what a backend reports back.

The contract between ``apps.deployments`` (which decides what should be live) and a serving
backend (Ray Serve in :mod:`worker.serving.fleet`, SageMaker multi-model endpoints in
:mod:`worker.serving.sagemaker`). Plain dataclasses and a Protocol: no Django here, since
this code runs on fleet hosts too.

The workbench is the source of truth: it sends the *whole* desired set of models of a pool
with every :meth:`ServingBackend.apply`; a backend makes the fleet match it (load what is
new, unload what is gone) and never decides on its own what should be live.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict


@dataclass(frozen=True)
class ModelSpec:
    """One model version that should be served.

    ``model_id`` is the workbench's ModelVersion id (unique across tenants). ``artifact_uri``
    is ``file:///abs/path.tar`` or ``s3://bucket/key.tar``: the deterministic tar the
    training run packed (safetensors weights, tokenizer, config, labels); a replica refuses
    bytes whose sha256 is not ``sha256``. ``memory_bytes`` is the footprint measured at
    registration, what placement packs by. ``pinned`` models (production) are placed on a
    replica set and preloaded; unpinned ones live in the pool's long-tail cache tier and
    load on first use.

    An adapter (a tenant's low-rank adapter and head on a shared base) names its shared
    base: ``base_sha256`` is the sha256 of the base's weights (a replica refuses an adapter
    whose base it does not hold) and ``base_memory_bytes`` the base's footprint, which a
    replica holds once for all its adapters on it; ``memory_bytes`` is then only what the
    tenant adds. Both are empty/0 for a full model.

    An embedding model names the index its searches use (``index_uri``, bound by
    ``index_sha256``: :mod:`worker.serving.embedding`) and, during a reindex, the staged one
    being verified (``staged_index_*``): a replica holds both until the staged one is made
    the index. Empty for classifiers.
    """

    model_id: str
    artifact_uri: str
    sha256: str
    memory_bytes: int
    pinned: bool = True
    base_sha256: str = ""
    base_memory_bytes: int = 0
    index_uri: str = ""
    index_sha256: str = ""
    staged_index_uri: str = ""
    staged_index_sha256: str = ""


@dataclass(frozen=True)
class PoolSpec:
    """Capacity settings of one serving pool (one per model kind)."""

    kind: str = "classifier"
    # Memory budget of pinned models on one replica; every replica of a set holds all of
    # its set's models, so this is also the budget of a set.
    replica_memory_bytes: int = 512 * 1024 * 1024
    # How many replica sets the pool may have: the pool's capacity is
    # max_sets * replica_memory_bytes of pinned models.
    max_sets: int = 4
    # Memory budget of the long-tail (unpinned) cache tier on each tail replica.
    tail_memory_bytes: int = 256 * 1024 * 1024
    # Autoscaling of each replica set on its request load.
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    # Request batching inside a replica. No waiting by default: a lone request goes at
    # once, and requests that arrive while a forward pass runs are batched into the next
    # (waiting 2 ms for company cost every quiet request 2 ms).
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0


class InsufficientCapacity(Exception):
    """The pool cannot hold every pinned model; nothing was changed."""

    def __init__(self, *, need_bytes: int, have_bytes: int, detail: str = "") -> None:
        self.need_bytes = need_bytes
        self.have_bytes = have_bytes
        message = f"insufficient capacity: need {need_bytes} bytes, have {have_bytes} bytes"
        super().__init__(f"{message} ({detail})" if detail else message)


@dataclass(frozen=True)
class Placement:
    """Which replica set (0-based index) holds each pinned model, and what moved."""

    assignment: dict[str, int]
    moved: list[str] = field(default_factory=list)  # models that changed set (not new ones)
    used_bytes: list[int] = field(default_factory=list)  # per set, pinned bytes + bases


INDEX_FIELDS = ("index_uri", "index_sha256", "staged_index_uri", "staged_index_sha256")


class Output(TypedDict):
    label: str
    score: float


@dataclass(frozen=True)
class PredictResult:
    outputs: list[Output]
    latency_ms: float  # as measured by the caller, around the whole round trip
    replica_id: str


class ModelLoadError(Exception):
    """A model could not be loaded (bad bytes, sha256 mismatch, unreadable artifact)."""


class ServingBackend(Protocol):
    """What the workbench needs from a serving backend."""

    def apply(
        self,
        pool: PoolSpec,
        models: Sequence[ModelSpec],
        *,
        previous: Mapping[str, int] | None = None,
    ) -> Placement:
        """Make the pool serve exactly ``models``; raise InsufficientCapacity before
        changing anything if the pinned ones do not fit. ``previous`` is the last
        placement, so as few models as possible move."""
        ...

    def wait_ready(
        self, kind: str, model_ids: Sequence[str], *, timeout_s: float
    ) -> dict[str, str | None]:
        """Block until every replica that should hold each model has it loaded; returns
        model id -> None when loaded everywhere, or the load error / "timeout" / "not in
        pool" (the pool was applied without it)."""
        ...

    def predict(self, kind: str, model_id: str, texts: list[str]) -> PredictResult:
        """Raises ModelLoadError if the model cannot be loaded, KeyError if it is not in
        the pool."""
        ...

    def lost(self) -> bool:
        """The cluster this process was connected to is gone (cheap: no reconnecting)."""
        ...

    def ensure_connected(self) -> bool:
        """Connect (again, after the cluster was lost); False when nothing answers."""
        ...

    def serving(self, kind: str, model_ids: Sequence[str]) -> dict[str, str | None]:
        """One look, no waiting: model id -> None when at least one replica serves it,
        else why not."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """:meth:`status` plus, under ``routing``, what drivers without a connection to
        the backend need to send predicts (per kind; empty where the backend routes)."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-able fleet state: pools, replicas, models on each, per-model metrics
        (see the backend's docstring for the exact shape)."""
        ...
