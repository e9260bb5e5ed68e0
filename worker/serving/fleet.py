"""The Ray Serve backend of the serving fleet: :class:`RayFleet` implements
:class:`worker.serving.specs.ServingBackend`.

Layout on Ray: one Serve application per pool (model kind), named ``<namespace>-<kind>``,
holding

- one deployment per replica set, ``<kind>-set-<index>``, each replica of which holds every
  pinned model placement gave the set (:func:`worker.serving.placement.place`), and which
  autoscales between the pool's ``min_replicas`` and ``max_replicas`` on its own request
  load: a burst on one tenant adds replicas of that tenant's set only;
- one tail deployment, ``<kind>-tail``, for the deployed but unpinned models (loaded on
  first use, kept by the tier's frequency-aware policy within ``tail_memory_bytes``). The
  tail is the application's ingress and holds the pool's routing table.

What each replica holds travels as its deployment's ``user_config``; Serve applies a new
one by calling ``reconfigure`` on the running replicas, so an apply loads and unloads
models without restarting anything. (Serve restarts replicas when a deployment's *code
version* changes; ``serve.run`` picks a random one per call unless the deployment has one,
so this module pins it to a digest of the serving code: see :func:`code_version`.)

When placement moves a model to another set, :meth:`RayFleet.apply` deploys twice: first
with the model in both its old and its new set (the new set loads it; for that while the
old set is over its budget by the moved models), waits until it is loaded, then the final
configuration, so the model is served throughout.

Predictions go from the driver straight to a replica (``direct=True``, the default),
through the replica's own socket (:mod:`worker.serving.fastpath`: ~0.2 ms over the work)
where it publishes one and this host can reach it, else by one Ray actor call to the
replica's ``handle_request`` (the entry point Serve's own router calls, with the request
metadata it would send; ~4 ms over the work). Serve's handle path (driver thread -> router
event loop -> replica -> back) costs ~7 ms more than the actor call on a busy 2-core
machine; the direct path keeps Serve for everything else (deploys, reconfigures, restarts,
autoscaling), and falls back to the cached ``DeploymentHandle`` when no running replica is
known or the one chosen died. Serve's autoscaler then needs the replicas, not the handles,
to report their load: each replica reports its socket's ongoing requests as a custom
metric, which the pools' policy (:mod:`worker.serving.autoscaling`) adds to the requests
Serve counted, and heads started by :mod:`worker.serving.local_ray` set
``RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE=0`` so that the actor calls are counted
by the replicas too (a production cluster should set it as well). There is no HTTP proxy:
the application has no route.

The driver learns which deployment holds a model from the tail
once, caches it, and refreshes it when a replica answers :class:`ModelNotHere`.

Embedded mode: with no address, the first call that needs Ray starts a private head under
``local_dir`` (:mod:`worker.serving.local_ray`) and later processes reuse it.

:meth:`RayFleet.status` returns (JSON-able)::

    {"pools": [{
        "kind": "classifier",
        "app": "<namespace>-classifier",
        "pool": {PoolSpec fields...},
        "sets": [{
            "name": "classifier-set-0", "index": 0, "budget_bytes": int,
            "min_replicas": int, "max_replicas": int,
            "models": [model ids placed on the set],
            "replicas": [{
                "replica_id": str, "started_at": float (unix time), "device": "cpu"|"cuda",
                "version": str (config digest applied), "rss_bytes": int,
                "memory_used_bytes": int (weights of the models held, and each shared
                                          base once),
                "socket_requests": int (requests that came through its own socket),
                "bases": [{"base_model", "sha256", "memory_bytes": int,
                           "adapters": int (loaded adapters on it)}, ...],
                "models": [{
                    "model_id", "sha256", "pinned": bool, "loaded": bool,
                    "format": "full" | "adapter", "base_sha256": str ("" for full),
                    "memory_bytes": int, "load_ms": float | None, "hits": int,
                    "misses": int, "requests": int, "errors": int,
                    "latency_ms_p50": float | None, "latency_ms_p99": float | None,
                    "error": str | None,
                }, ...],
            }, ...],
        }, ...],
        "tail": {same shape as a set, "index": -1; its replicas list only the models
                 they hold or were asked for},
    }, ...]}

Latencies are measured inside the replica (request in to answer out, batching wait
included), over each model's last 1,024 requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.serving import ray_private
from worker.serving.autoscaling import POLICY
from worker.serving.placement import place, spec_bases
from worker.serving.ray_connection import _FLEETS
from worker.serving.ray_routing import DIRECT_REFRESH_S, FAST_RETRY_AFTER_S, PREDICT_TIMEOUT_S
from worker.serving.ray_status import NOT_IN_POOL_AFTER_S, RayStatus
from worker.serving.routing import (
    Route,
    app_name,
    replica_config,
    route_of,
    set_deployment,
    tail_deployment,
)
from worker.serving.specs import (
    InsufficientCapacity,
    ModelLoadError,
    ModelSpec,
    Placement,
    PoolSpec,
)

logger = logging.getLogger(__name__)

SERVING_SOURCES = (
    "app.py",
    "autocomplete.py",
    "autoscaling.py",
    "cache.py",
    "embedding.py",
    "fastpath.py",
    "loading.py",
    "ray_private.py",
    "routing.py",
    "specs.py",
)
# How long apply waits for moved models to load in their new set before the old set
# lets them go.
MOVE_TIMEOUT_S = 120.0

__all__ = [
    "DIRECT_REFRESH_S",
    "FAST_RETRY_AFTER_S",
    "NOT_IN_POOL_AFTER_S",
    "PREDICT_TIMEOUT_S",
    "InsufficientCapacity",
    "ModelLoadError",
    "RayFleet",
    "close_all",
    "code_version",
]


def close_all() -> None:
    """:meth:`RayFleet.close` every fleet driver of this process (before it leaves Ray)."""
    for fleet in list(_FLEETS):
        fleet.close()


def code_version() -> str:
    """A digest of the code a replica runs: replicas restart when it changes, not on a
    configuration change."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in SERVING_SOURCES:
        digest.update((here / name).read_bytes())
    # The model code replicas run from outside serving/: classifiers' and autocomplete's.
    for name in ("modeling.py", "autocomplete.py", "autocomplete_text.py"):
        digest.update((here.parent / name).read_bytes())
    return digest.hexdigest()[:16]


class RayFleet(RayStatus):
    """Serving pools on Ray Serve (see the module docstring): applying here; the
    connection, predict path and status in :mod:`~worker.serving.ray_connection`,
    :mod:`~worker.serving.ray_routing` and :mod:`~worker.serving.ray_status`."""

    # --- apply -----------------------------------------------------------------------

    def apply(
        self,
        pool: PoolSpec,
        models: Sequence[ModelSpec],
        *,
        previous: Mapping[str, int] | None = None,
    ) -> Placement:
        ids = [spec.model_id for spec in models]
        if len(set(ids)) != len(ids):
            raise ValueError("a model id appears twice in the pool")
        pinned = {spec.model_id: spec.memory_bytes for spec in models if spec.pinned}
        bases, base_sizes = spec_bases(spec for spec in models if spec.pinned)
        # Before touching anything: raises InsufficientCapacity and the old config serves.
        placement = place(
            pinned,
            budget_bytes=pool.replica_memory_bytes,
            max_sets=pool.max_sets,
            previous=previous,
            bases=bases,
            base_sizes=base_sizes,
        )
        self._connect()
        by_id = {spec.model_id: spec for spec in models}
        final: dict[int, list[ModelSpec]] = {}
        for model_id, index in placement.assignment.items():
            final.setdefault(index, []).append(by_id[model_id])
        if placement.moved and previous:
            # Load the moved models in their new set first, while the old set still
            # serves them; then the final config lets the old set drop them.
            staged = {index: list(specs) for index, specs in final.items()}
            for model_id in placement.moved:
                old = previous[model_id]
                staged.setdefault(old, []).append(by_id[model_id])
            self._deploy(pool, models, staged, placement.assignment)
            errors = self.wait_ready(pool.kind, placement.moved, timeout_s=MOVE_TIMEOUT_S)
            failed = {m: e for m, e in errors.items() if e is not None}
            if failed:
                logger.warning("moved models not ready in their new set: %s", failed)
        self._deploy(pool, models, final, placement.assignment)
        return placement

    def _deploy(
        self,
        pool: PoolSpec,
        models: Sequence[ModelSpec],
        sets: Mapping[int, list[ModelSpec]],
        assignment: Mapping[str, int],
    ) -> None:
        from ray import serve

        from worker.serving.app import ModelReplica as replica_class

        # @serve.deployment turned the class into a Deployment; its stubs do not say so.
        ModelReplica: Any = replica_class

        kind = pool.kind
        app = app_name(self.namespace, kind)
        if not models:
            serve.delete(app)
            self._routes.pop(kind, None)
            return
        routes: dict[str, Route] = {
            spec.model_id: route_of(
                spec,
                set_deployment(kind, assignment[spec.model_id])
                if spec.pinned
                else tail_deployment(kind),
            )
            for spec in models
        }
        version = code_version()
        options = self._actor_options()
        autoscaling = {
            **self.autoscaling_options,
            "min_replicas": pool.min_replicas,
            "max_replicas": pool.max_replicas,
            "initial_replicas": pool.min_replicas,
            "target_ongoing_requests": pool.target_ongoing_requests,
        }
        autoscaling.setdefault("policy", {"policy_function": POLICY})
        bound_sets = []
        for index in sorted(sets):
            config = replica_config(
                pool,
                role="set",
                index=index,
                models=sets[index],
                budget_bytes=pool.replica_memory_bytes,
            )
            deployment = ModelReplica.options(
                name=set_deployment(kind, index),
                user_config=dict(config),
                autoscaling_config=autoscaling,
                ray_actor_options=options,
            )
            ray_private.pin_code_version(deployment, f"{version}-set")  # see the docstring
            bound_sets.append(deployment.bind(kind, "set"))
        tail_config = replica_config(
            pool,
            role="tail",
            index=-1,
            models=[spec for spec in models if not spec.pinned],
            budget_bytes=pool.tail_memory_bytes,
            routes=routes,
            sets=sorted(sets),
        )
        tail = ModelReplica.options(
            name=tail_deployment(kind),
            user_config=dict(tail_config),
            autoscaling_config=autoscaling,
            ray_actor_options=options,
        )
        ray_private.pin_code_version(tail, f"{version}-tail")
        serve.run(tail.bind(kind, "tail", *bound_sets), name=app, route_prefix=None)
        self._routes[kind] = routes

    def _actor_options(self) -> dict[str, Any]:
        import ray

        gpus = self.num_gpus_per_replica
        if gpus is None:
            # Once per connection: a call to the GCS on every apply blocks when it is gone.
            if self._gpus is None:
                resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
                self._gpus = 0.1 if resources.get("GPU", 0) > 0 else 0.0
            gpus = self._gpus
        options: dict[str, Any] = {"num_cpus": self.num_cpus_per_replica}
        if gpus:
            options["num_gpus"] = gpus
        return options

    # --- tests and operations --------------------------------------------------------

    def shutdown_pool(self, kind: str) -> None:
        """Delete the pool's application (all its replicas)."""
        from ray import serve

        if self._connect(start=False):
            serve.delete(app_name(self.namespace, kind))
        self._routes.pop(kind, None)
        _shut([h for k, h in self._handles.items() if k[0] == kind])
        self._handles = {k: h for k, h in self._handles.items() if k[0] != kind}
        self._replicas = {k: r for k, r in self._replicas.items() if k[0] != kind}
        self._fast.close()


def _shut(handles: list[Any]) -> None:
    for handle in handles:
        with contextlib.suppress(Exception):  # already shut, or Ray already gone
            handle.shutdown()
