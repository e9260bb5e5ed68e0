"""What the fleet's driver side (:mod:`worker.serving.fleet`) and its replicas
(:mod:`worker.serving.app`) agree on: names, the configuration a replica is given, where
replicas publish their statistics. Light on purpose (no torch, no Ray): the web process
imports it on every predict.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, NotRequired, TypedDict, cast

from worker.serving.specs import INDEX_FIELDS, ModelSpec, PoolSpec

# Serve's own namespace: its replica actors are named there (see :func:`replica_actor_prefix`).
SERVE_NAMESPACE = "serve"
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"
# Replicas publish their statistics in Ray's GCS key-value store under
# ``<STATS_KV_PREFIX><app>/<deployment>/<replica id>`` every STATS_PUSH_INTERVAL_S.
STATS_KV_PREFIX = "workbench-serving/"
STATS_PUSH_INTERVAL_S = 1.0


class ModelNotHere(LookupError):
    """The replica asked does not hold the model (the driver's routing table is stale)."""


class IndexNotHere(LookupError):
    """The replica does not hold the embedding index asked for (a staged index still
    loading, or one it let go)."""


class ModelEntry(TypedDict):
    """A :class:`~worker.serving.specs.ModelSpec` as a replica is given it. Configs written
    before adapters lack the two base keys: replicas read them with ``.get``."""

    model_id: str
    artifact_uri: str
    sha256: str
    memory_bytes: int
    pinned: bool
    base_sha256: str  # "" for a full model
    base_memory_bytes: int  # 0 for a full model
    # An embedding model's index and staged index (absent for classifiers).
    index_uri: NotRequired[str]
    index_sha256: NotRequired[str]
    staged_index_uri: NotRequired[str]
    staged_index_sha256: NotRequired[str]


class Route(TypedDict):
    deployment: str
    sha256: str
    # An embedding model's index (and staged index) sha256; absent for classifiers.
    index_sha256: NotRequired[str]
    staged_index_sha256: NotRequired[str]


class ReplicaConfig(TypedDict):
    """The ``user_config`` of a replica set or tail deployment: what it must hold.

    ``routes`` (model id -> deployment and sha256, every model of the pool) is only in the
    tail's config: the tail is the pool's ingress, and drivers ask it where a model lives.
    """

    kind: str
    role: str  # "set" or "tail"
    index: int  # the set's index; -1 for the tail
    models: list[ModelEntry]
    budget_bytes: int
    max_batch_size: int
    batch_wait_timeout_s: float
    routes: dict[str, Route]
    pool: dict[str, Any]  # the PoolSpec's fields, and "sets": the set indices deployed
    version: str  # a digest of the fields above, so a driver can tell a replica is current


def route_of(spec: ModelSpec, deployment: str) -> Route:
    """A model's route; an embedding model's names its index (and staged one)."""
    route = Route(deployment=deployment, sha256=spec.sha256)
    if spec.index_sha256:
        route["index_sha256"] = spec.index_sha256
    if spec.staged_index_sha256:
        route["staged_index_sha256"] = spec.staged_index_sha256
    return route


def app_name(namespace: str, kind: str) -> str:
    return f"{namespace}-{kind}"


def set_deployment(kind: str, index: int) -> str:
    return f"{kind}-set-{index}"


def tail_deployment(kind: str) -> str:
    return f"{kind}-tail"


def replica_actor_prefix(app: str, deployment: str) -> str:
    """Serve names each replica actor ``SERVE_REPLICA::<app>#<deployment>#<replica id>``."""
    return f"{REPLICA_ACTOR_PREFIX}{app}#{deployment}#"


def stats_key(app: str, deployment: str, replica_id: str) -> str:
    return f"{STATS_KV_PREFIX}{app}/{deployment}/{replica_id}"


def replica_config(
    pool: PoolSpec,
    *,
    role: str,
    index: int,
    models: Sequence[ModelSpec],
    budget_bytes: int,
    routes: Mapping[str, Route] | None = None,
    sets: Sequence[int] = (),
) -> ReplicaConfig:
    entries = [
        cast(ModelEntry, {k: v for k, v in asdict(spec).items() if v or k not in INDEX_FIELDS})
        for spec in sorted(models, key=lambda spec: spec.model_id)
    ]
    body: dict[str, Any] = {
        "kind": pool.kind,
        "role": role,
        "index": index,
        "models": entries,
        "budget_bytes": budget_bytes,
        "max_batch_size": pool.max_batch_size,
        "batch_wait_timeout_s": pool.batch_wait_timeout_s,
        "routes": dict(sorted((routes or {}).items())),
        "pool": {**asdict(pool), "sets": sorted(sets)},
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return ReplicaConfig(**body, version=digest)  # type: ignore[typeddict-item]
