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
                "memory_used_bytes": int (weights of the models held),
                "socket_requests": int (requests that came through its own socket),
                "models": [{
                    "model_id", "sha256", "pinned": bool, "loaded": bool,
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
import json
import logging
import socket
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker.serving import local_ray
from worker.serving.autoscaling import POLICY
from worker.serving.fastpath import Endpoint, FastClient, FastPathUnavailable
from worker.serving.placement import place
from worker.serving.routing import (
    REPLICA_ACTOR_PREFIX,
    SERVE_NAMESPACE,
    STATS_KV_PREFIX,
    ModelNotHere,
    ReplicaConfig,
    Route,
    app_name,
    replica_actor_prefix,
    replica_config,
    set_deployment,
    tail_deployment,
)
from worker.serving.specs import (
    InsufficientCapacity,
    ModelLoadError,
    ModelSpec,
    Placement,
    PoolSpec,
    PredictResult,
)

logger = logging.getLogger(__name__)

SERVING_SOURCES = (
    "app.py",
    "autoscaling.py",
    "cache.py",
    "fastpath.py",
    "loading.py",
    "routing.py",
    "specs.py",
)
PREDICT_TIMEOUT_S = 60.0
# How long apply waits for moved models to load in their new set before the old set
# lets them go.
MOVE_TIMEOUT_S = 120.0
# How long wait_ready lets a model be missing from its pool's routing table (a change
# still reaching the tail replica) before answering "not in pool".
NOT_IN_POOL_AFTER_S = 15.0
# How long the direct path trusts its list of a deployment's replicas.
DIRECT_REFRESH_S = 2.0
# How long a replica socket that failed is left alone (calls take the Ray actor path):
# a port this host cannot reach must not cost a connect timeout on every call.
FAST_RETRY_AFTER_S = 30.0

__all__ = ["InsufficientCapacity", "ModelLoadError", "RayFleet", "close_all", "code_version"]

_FLEETS: weakref.WeakSet[RayFleet] = weakref.WeakSet()


def close_all() -> None:
    """:meth:`RayFleet.close` every fleet driver of this process (before it leaves Ray)."""
    for fleet in list(_FLEETS):
        fleet.close()


@dataclass
class _Replica:
    """A running replica as the direct path knows it."""

    name: str  # its actor's name, in Serve's namespace
    endpoint: Endpoint | None  # its socket, if it published one
    actor: Any = None  # its actor handle, looked up on first use


def code_version() -> str:
    """A digest of the code a replica runs: replicas restart when it changes, not on a
    configuration change."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in SERVING_SOURCES:
        digest.update((here / name).read_bytes())
    digest.update((here.parent / "modeling.py").read_bytes())
    return digest.hexdigest()[:16]


class RayFleet:
    """Serving pools on Ray Serve (see the module docstring)."""

    def __init__(
        self,
        *,
        address: str | None,
        namespace: str = "workbench",
        local_dir: Path,
        num_cpus_per_replica: float = 0.5,
        num_gpus_per_replica: float | None = None,
        autoscaling_options: Mapping[str, Any] | None = None,
        direct: bool = True,
        fast_path: bool = True,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self.local_dir = Path(local_dir)
        self.num_cpus_per_replica = num_cpus_per_replica
        # None: a tenth of a GPU per replica where the cluster has GPUs, none elsewhere.
        self.num_gpus_per_replica = num_gpus_per_replica
        # More of Serve's AutoscalingConfig (upscale_delay_s, downscale_delay_s,
        # look_back_period_s, ...) for every deployment; PoolSpec sets the rest.
        self.autoscaling_options = dict(autoscaling_options or {})
        self._lock = threading.Lock()
        self._connected = False
        self._head: local_ray.LocalRay | None = None  # the embedded head connected to
        self.direct = direct
        self.fast_path = fast_path
        self._fast = FastClient()
        self._fast_failed: dict[Endpoint, float] = {}
        self._replicas: dict[tuple[str, str], tuple[float, list[_Replica]]] = {}
        self._round_robin = 0
        self._routes: dict[str, dict[str, Route]] = {}
        self._handles: dict[tuple[str, str, str | None], Any] = {}
        _FLEETS.add(self)

    # --- connection ------------------------------------------------------------------

    def _connect(self, *, start: bool = True) -> bool:
        """Connect this process to Ray (starting the embedded head if ``start``)."""
        if self._connected:
            return True
        with self._lock:
            if self._connected:
                return True
            import ray
            from ray._private import auto_init_hook

            # Ray starts a new local cluster (in the shared /tmp/ray) whenever a Ray call
            # is made while disconnected, e.g. by Serve's background threads after a
            # shutdown: a fleet driver only ever talks to its own cluster.
            auto_init_hook.enable_auto_connect = False
            address = self.address
            if address is None:
                head = self._embedded_head(start=start)
                if head is None:
                    return False
                local_ray.use_head_auth(head)
                address = head.address
                self._head = head
            if not ray.is_initialized():
                ray.init(
                    address=address,
                    namespace=self.namespace,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=False,
                )
            from ray import serve

            serve.start(proxy_location="Disabled")
            self._connected = True
            return True

    def ensure_connected(self) -> bool:
        """Connected to a live cluster, reconnecting when the one this driver knew is gone
        (a new head after the old one died: its GCS is new, Serve there starts empty and
        the controller applies every pool again). In embedded mode a dead head is replaced
        by a new one. False when no cluster answers; the fleet controller then reports
        every deployment as not served and tries again on its next pass.

        Ray ends a driver that loses its GCS for longer than its reconnect timeout (60 s),
        so this must run more often than that: the controller calls it on every pass."""
        if self._connected and not self._head_alive():
            logger.warning("the Ray cluster was lost; reconnecting")
            self._disconnect()
        try:
            return self._connect(start=True)
        except Exception:
            logger.exception("cannot connect to the Ray cluster")
            self._disconnect()
            return False

    def _head_alive(self) -> bool:
        if self.address is None:
            return self._head is not None and local_ray.is_alive(self._head)
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            return False

    def _disconnect(self) -> None:
        import ray

        self.close()
        self._routes.clear()
        with contextlib.suppress(Exception):  # the cluster is gone: nothing to say goodbye to
            ray.shutdown()
        self._connected = False
        self._head = None

    def _embedded_head(self, *, start: bool) -> local_ray.LocalRay | None:
        if start:
            return local_ray.ensure_head(self.local_dir)
        state = self.local_dir / local_ray.STATE_FILE
        try:
            head = local_ray.LocalRay(**json.loads(state.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return head if local_ray.is_alive(head) else None

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
        # Before touching anything: raises InsufficientCapacity and the old config serves.
        placement = place(
            pinned,
            budget_bytes=pool.replica_memory_bytes,
            max_sets=pool.max_sets,
            previous=previous,
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
            spec.model_id: Route(
                deployment=set_deployment(kind, assignment[spec.model_id])
                if spec.pinned
                else tail_deployment(kind),
                sha256=spec.sha256,
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
            deployment._version = f"{version}-set"  # see the module docstring
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
        tail._version = f"{version}-tail"
        serve.run(tail.bind(kind, "tail", *bound_sets), name=app, route_prefix=None)
        self._routes[kind] = routes

    def _actor_options(self) -> dict[str, Any]:
        import ray

        gpus = self.num_gpus_per_replica
        if gpus is None:
            resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
            gpus = 0.1 if resources.get("GPU", 0) > 0 else 0.0
        options: dict[str, Any] = {"num_cpus": self.num_cpus_per_replica}
        if gpus:
            options["num_gpus"] = gpus
        return options

    # --- predict ---------------------------------------------------------------------

    def predict(self, kind: str, model_id: str, texts: list[str]) -> PredictResult:
        started = time.perf_counter()
        if not self._connect(start=False):
            raise KeyError(f"model {model_id} is not in the {kind} pool (no fleet running)")
        for attempt in range(3):
            route = self._route(kind, model_id, refresh=attempt > 0)
            try:
                reply = self._call(kind, route["deployment"], model_id, texts)
            except ModelNotHere:
                continue  # stale routing table: refresh it and try again
            return PredictResult(
                outputs=reply["outputs"],
                latency_ms=(time.perf_counter() - started) * 1000,
                replica_id=reply["replica_id"],
            )
        raise KeyError(f"model {model_id} is not in the {kind} pool")

    def _call(self, kind: str, deployment: str, model_id: str, texts: list[str]) -> Any:
        """One predict call: straight to a replica when ``direct`` (its socket, else a Ray
        actor call; see the module docstring), through the deployment's handle otherwise or
        when no replica is known or the one chosen died."""
        if self.direct:
            import ray

            replica = self._direct_replica(kind, deployment, model_id)
            if replica is not None:
                endpoint = replica.endpoint
                if endpoint is not None and self._fast_usable(endpoint):
                    try:
                        return self._fast.call(
                            endpoint, model_id, texts, timeout_s=PREDICT_TIMEOUT_S
                        )
                    except FastPathUnavailable as error:
                        # Gone, or unreachable from here: this call goes through Ray.
                        logger.info("replica socket unusable, using Ray: %s", error)
                        self._fast.forget(endpoint)
                        self._fast_failed[endpoint] = time.monotonic()
                try:
                    if replica.actor is None:
                        replica.actor = ray.get_actor(replica.name, namespace=SERVE_NAMESPACE)
                    return ray.get(
                        replica.actor.handle_request.remote(
                            self._request_metadata(kind, model_id), model_id, texts
                        ),
                        timeout=PREDICT_TIMEOUT_S,
                    )
                except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    self._replicas.pop((kind, deployment), None)  # gone: ask again
        handle = self._handle(kind, deployment, model_id)
        return handle.predict.remote(model_id, texts).result(timeout_s=PREDICT_TIMEOUT_S)

    def _fast_usable(self, endpoint: Endpoint) -> bool:
        if not self.fast_path:
            return False
        failed = self._fast_failed.get(endpoint)
        if failed is None:
            return True
        if time.monotonic() - failed < FAST_RETRY_AFTER_S:
            return False
        del self._fast_failed[endpoint]
        return True

    def _request_metadata(self, kind: str, model_id: str) -> bytes:
        import pickle
        import uuid

        from ray.serve._private.common import RequestMetadata

        request_id = uuid.uuid4().hex
        return pickle.dumps(
            RequestMetadata(
                request_id=request_id,
                internal_request_id=request_id,
                call_method="predict",
                app_name=app_name(self.namespace, kind),
                multiplexed_model_id=model_id,
            )
        )

    def _direct_replica(self, kind: str, deployment: str, model_id: str) -> _Replica | None:
        """A running replica of ``deployment`` (the list refreshed every few seconds): round
        robin over a set's replicas; for the tail, the same replica for the same model
        while the replicas do not change, so a model's requests find it loaded."""
        key = (kind, deployment)
        cached = self._replicas.get(key)
        now = time.monotonic()
        if cached is None or now - cached[0] > DIRECT_REFRESH_S:
            fresh = (now, self._running_replicas(kind, deployment))
            self._forget_gone(cached[1] if cached else [], fresh[1])
            cached = self._replicas[key] = fresh
        replicas = cached[1]
        if not replicas:
            return None
        if deployment == tail_deployment(kind):
            digest = hashlib.sha256(model_id.encode()).digest()
            return replicas[int.from_bytes(digest[:4], "big") % len(replicas)]
        self._round_robin = (self._round_robin + 1) % len(replicas)
        return replicas[self._round_robin]

    def _forget_gone(self, before: list[_Replica], now: list[_Replica]) -> None:
        """Close the connections to replicas that are gone (scaled down, restarted), so a
        long-lived web worker does not collect dead sockets as the fleet changes."""
        current = {replica.endpoint for replica in now}
        for replica in before:
            if replica.endpoint is not None and replica.endpoint not in current:
                self._fast.forget(replica.endpoint)
        expired = time.monotonic() - FAST_RETRY_AFTER_S
        for endpoint, failed in list(self._fast_failed.items()):
            if failed < expired:
                del self._fast_failed[endpoint]

    def _running_replicas(self, kind: str, deployment: str) -> list[_Replica]:
        """The replicas that are alive and have applied a configuration (they publish
        statistics only after that), with their sockets."""
        app = app_name(self.namespace, kind)
        prefix = replica_actor_prefix(app, deployment)
        return [
            _Replica(name=f"{prefix}{stats['replica_id']}", endpoint=Endpoint.from_stats(stats))
            for stats in self._replica_stats(app, deployment).get(deployment, [])
        ]

    def _route(self, kind: str, model_id: str, *, refresh: bool) -> Route:
        routes = self._routes.get(kind)
        if routes is None or refresh or model_id not in routes:
            routes = self._fetch_routes(kind)
        route = routes.get(model_id)
        if route is None:
            raise KeyError(f"model {model_id} is not in the {kind} pool")
        return route

    def _fetch_routes(self, kind: str) -> dict[str, Route]:
        from ray.serve.exceptions import RayServeException

        try:
            handle = self._handle(kind, tail_deployment(kind), None)
            routes: dict[str, Route] = handle.routes.remote().result(timeout_s=30)
        except (RayServeException, ValueError, KeyError):
            routes = {}  # no such application or deployment
        self._routes[kind] = routes
        return routes

    def _handle(self, kind: str, deployment: str, model_id: str | None) -> Any:
        """A cached handle; tail handles are per model, for Serve's model-aware routing."""
        is_tail = deployment == tail_deployment(kind)
        key = (kind, deployment, model_id if is_tail else None)
        handle = self._handles.get(key)
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(deployment, app_name(self.namespace, kind))
            if is_tail and model_id is not None:
                handle = handle.options(multiplexed_model_id=model_id)
            self._handles[key] = handle
        return handle

    # --- readiness and status --------------------------------------------------------

    def wait_ready(
        self, kind: str, model_ids: Sequence[str], *, timeout_s: float
    ) -> dict[str, str | None]:
        deadline = time.monotonic() + timeout_s
        pending = set(model_ids)
        result: dict[str, str | None] = {}
        if not self._connect(start=False):
            return dict.fromkeys(model_ids, "no fleet running")
        absent_since: dict[str, float] = {}
        while True:
            routes = self._fetch_routes(kind)
            replicas = self._replica_stats(app_name(self.namespace, kind))
            for model_id in sorted(pending):
                outcome = _readiness(model_id, routes.get(model_id), replicas)
                if model_id in routes:
                    absent_since.pop(model_id, None)
                elif time.monotonic() - absent_since.setdefault(model_id, time.monotonic()) > (
                    NOT_IN_POOL_AFTER_S
                ):
                    # The pool's routing table has gone on without it (the pool was applied
                    # without it since, or deleted): it will never load.
                    outcome = "not in pool"
                if outcome != "pending":
                    result[model_id] = outcome
                    pending.discard(model_id)
            if not pending:
                return result
            if time.monotonic() > deadline:
                result.update(dict.fromkeys(pending, "timeout"))
                return result
            time.sleep(0.2)

    def serving(self, kind: str, model_ids: Sequence[str]) -> dict[str, str | None]:
        """Model id -> None when at least one running replica of its deployment serves it
        (loaded, or verified in the tail), else why not ("no replica", "not in pool", the
        load error). Unlike :meth:`wait_ready` a set scaling up (a new replica still
        loading) does not count against it. One look, no waiting."""
        if not self._connect(start=False):
            return dict.fromkeys(model_ids, "no fleet running")
        routes = self._fetch_routes(kind)
        replicas = self._replica_stats(app_name(self.namespace, kind))
        result: dict[str, str | None] = {}
        for model_id in model_ids:
            route = routes.get(model_id)
            if route is None:
                result[model_id] = "not in pool"
                continue
            running = replicas.get(route["deployment"], [])
            if not running:
                result[model_id] = f"no running replica of {route['deployment']}"
                continue
            errors = []
            for replica in running:
                entry = next((m for m in replica["models"] if m["model_id"] == model_id), None)
                if entry is None or entry["sha256"] != route["sha256"]:
                    continue
                if entry["error"]:
                    errors.append(str(entry["error"]))
                elif entry["loaded"] or (not entry["pinned"] and entry["load_ms"] is not None):
                    break
            else:
                result[model_id] = errors[0] if errors else "not loaded on any replica"
                continue
            result[model_id] = None
        return result

    def status(self) -> dict[str, Any]:
        return {"pools": self.snapshot()["pools"]}

    def snapshot(self) -> dict[str, Any]:
        """The public status (:meth:`status`) and, per pool, the routing table the fleet
        controller publishes for drivers without Ray: ``{"routing": {kind: {"models":
        {model id: {"deployment", "sha256"}}, "endpoints": {deployment: [{"host", "port",
        "secret", "replica_id"}, ...]}}}}`` (secrets: never show this part)."""
        if not self._connect(start=False):
            return {"pools": [], "routing": {}}
        from ray import serve

        prefix = f"{self.namespace}-"
        pools = []
        routing: dict[str, Any] = {}
        for app in sorted(serve.status().applications):
            if not app.startswith(prefix):
                continue
            kind = app[len(prefix) :]
            replicas = self._replica_stats(app)
            status, routes = self._pool_status(kind, app, replicas)
            pools.append(status)
            routing[kind] = {
                "models": routes,
                "endpoints": {
                    deployment: [
                        asdict(endpoint)
                        for endpoint in (Endpoint.from_stats(stats) for stats in group)
                        if endpoint is not None
                    ]
                    for deployment, group in replicas.items()
                },
            }
        return {"pools": pools, "routing": routing}

    def _pool_status(
        self, kind: str, app: str, replicas: dict[str, list[dict[str, Any]]]
    ) -> tuple[dict[str, Any], dict[str, Route]]:
        config = self._tail_config(kind)
        pool = config["pool"] if config else asdict(PoolSpec(kind=kind))
        routes = config["routes"] if config else {}
        members: dict[str, list[str]] = {}
        for model_id, route in routes.items():
            members.setdefault(route["deployment"], []).append(model_id)

        def group(name: str, index: int, budget: int) -> dict[str, Any]:
            return {
                "name": name,
                "index": index,
                "budget_bytes": budget,
                "min_replicas": pool["min_replicas"],
                "max_replicas": pool["max_replicas"],
                "models": sorted(members.get(name, [])),
                "replicas": [_public(r) for r in replicas.get(name, [])],
            }

        sets = [
            group(set_deployment(kind, index), index, pool["replica_memory_bytes"])
            for index in pool.get("sets", [])
        ]
        status = {
            "kind": kind,
            "app": app,
            "pool": {k: v for k, v in pool.items() if k != "sets"},
            "sets": sets,
            "tail": group(tail_deployment(kind), -1, pool["tail_memory_bytes"]),
        }
        return status, dict(routes)

    def _tail_config(self, kind: str) -> ReplicaConfig | None:
        try:
            handle = self._handle(kind, tail_deployment(kind), None)
            config: ReplicaConfig | None = handle.config.remote().result(timeout_s=30)
        except Exception:
            return None
        return config

    def _replica_stats(
        self, app: str, deployment: str | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """deployment -> the statistics of its live replicas (stale entries removed); of
        one deployment only when it is given."""
        import ray
        from ray.experimental import internal_kv

        live: set[tuple[str, str]] = set()
        for actor in ray.util.list_named_actors(all_namespaces=True):
            name = actor["name"]
            if actor["namespace"] == SERVE_NAMESPACE and name.startswith(
                f"{REPLICA_ACTOR_PREFIX}{app}#"
            ):
                _, owner, replica_id = name[len(REPLICA_ACTOR_PREFIX) :].split("#")
                live.add((owner, replica_id))
        found: dict[str, list[dict[str, Any]]] = {}
        prefix = f"{STATS_KV_PREFIX}{app}/"
        scope = prefix if deployment is None else f"{prefix}{deployment}/"
        for raw_key in internal_kv._internal_kv_list(scope):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            owner, replica_id = key[len(prefix) :].split("/", 1)
            if (owner, replica_id) not in live:
                internal_kv._internal_kv_del(key)
                continue
            value = internal_kv._internal_kv_get(key)
            if value is not None:
                found.setdefault(owner, []).append(json.loads(value))
        for stats in found.values():
            stats.sort(key=lambda s: s["replica_id"])
        return found

    # --- tests and operations --------------------------------------------------------

    def replica_actors(self, kind: str, deployment: str) -> list[str]:
        """Names (in Serve's namespace) of the live replica actors of a deployment, e.g.
        to ``ray.kill(ray.get_actor(name, namespace="serve"))`` one in a test."""
        import ray

        self._connect(start=False)
        prefix = replica_actor_prefix(app_name(self.namespace, kind), deployment)
        return sorted(
            actor["name"]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == SERVE_NAMESPACE and actor["name"].startswith(prefix)
        )

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

    def close(self) -> None:
        """Let go of this driver's Serve handles and replica sockets. Call it before
        disconnecting from Ray: a handle's threads otherwise keep reporting to a controller
        they can no longer reach, and log it. The fleet reconnects on its next call."""
        _shut(list(self._handles.values()))
        self._handles.clear()
        self._replicas.clear()
        self._fast.close()


def _shut(handles: list[Any]) -> None:
    for handle in handles:
        with contextlib.suppress(Exception):  # already shut, or Ray already gone
            handle.shutdown()


def _public(stats: Mapping[str, Any]) -> dict[str, Any]:
    keep = (
        "replica_id",
        "started_at",
        "device",
        "version",
        "rss_bytes",
        "memory_used_bytes",
        "socket_requests",
    )
    return {**{k: stats.get(k) for k in keep}, "models": stats["models"]}


def _readiness(
    model_id: str, route: Route | None, replicas: Mapping[str, list[dict[str, Any]]]
) -> str | None:
    """None (ready), an error, or "pending"."""
    if route is None:
        return "pending"
    running = replicas.get(route["deployment"], [])
    if not running:
        return "pending"
    ready = 0
    for replica in running:
        entry = next((m for m in replica["models"] if m["model_id"] == model_id), None)
        if entry is None or entry["sha256"] != route["sha256"]:
            continue
        if entry["error"]:
            return str(entry["error"])
        if entry["loaded"] or (not entry["pinned"] and entry["load_ms"] is not None):
            ready += 1
    return None if ready == len(running) else "pending"
