"""The Ray Serve fleet's predict path: straight to a replica (its socket, else a Ray actor
call), Serve's handle as the last resort; the routing table and the replicas' published
statistics. Part of :class:`worker.serving.fleet.RayFleet` (see its docstring)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from worker.serving import ray_private
from worker.serving.fastpath import Endpoint, FastPathUnavailable
from worker.serving.ray_connection import RayConnection, _Replica
from worker.serving.routing import (
    REPLICA_ACTOR_PREFIX,
    SERVE_NAMESPACE,
    STATS_KV_PREFIX,
    ModelNotHere,
    Route,
    app_name,
    replica_actor_prefix,
    tail_deployment,
)
from worker.serving.specs import (
    PredictResult,
)

logger = logging.getLogger(__name__)

PREDICT_TIMEOUT_S = 60.0
# How long the direct path trusts its list of a deployment's replicas.
DIRECT_REFRESH_S = 2.0
# How long a replica socket that failed is left alone (calls take the Ray actor path):
# a port this host cannot reach must not cost a connect timeout on every call.
FAST_RETRY_AFTER_S = 30.0

# How long a call to the tail replica for its routes or configuration may take (ms when
# it is up): a controller must not sit in a call to a cluster that is gone.
CONTROL_TIMEOUT_S = 10.0


class RayRouting(RayConnection):
    """Predictions and routing (see the module docstring)."""

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

    def embed(self, kind: str, model_id: str, texts: list[str], role: str) -> dict[str, Any]:
        """An embedding model's vectors for ``texts`` (``role`` "query" or "document"):
        ``{"embeddings", "dim", "replica_id", "latency_ms"}``."""
        message = {"op": "embed", "model_id": model_id, "texts": texts, "role": role}
        return self._operate(kind, model_id, message)

    def search(
        self, kind: str, model_id: str, query: str, k: int, *, index: str = ""
    ) -> dict[str, Any]:
        """The ``k`` best documents of the model's index (or of the staged ``index``):
        ``{"results": [{"document_id", "title", "score"}], "index", "replica_id",
        "latency_ms"}``; IndexNotHere when a replica does not hold ``index``."""
        message = {"op": "search", "model_id": model_id, "query": query, "k": k, "index": index}
        return self._operate(kind, model_id, message)

    def complete(self, kind: str, model_id: str, **request: Any) -> dict[str, Any]:
        """An autocomplete model's completions (``request``: ``prefix``, ``context``,
        ``max_tokens``, ``n``, ``strategy``, ``top_k``, ``seed``, ``session``; see
        :func:`worker.serving.autocomplete.completion_request`): ``{"completions": [{"text",
        "score"}], "cached_tokens", "replica_id", "latency_ms"}``."""
        return self._operate(kind, model_id, {"op": "complete", "model_id": model_id, **request})

    def _operate(self, kind: str, model_id: str, message: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        if not self._connect(start=False):
            raise KeyError(f"model {model_id} is not in the {kind} pool (no fleet running)")
        for attempt in range(3):
            route = self._route(kind, model_id, refresh=attempt > 0)
            try:
                reply: dict[str, Any] = self._call_op(kind, route["deployment"], model_id, message)
            except ModelNotHere:
                continue
            reply["latency_ms"] = (time.perf_counter() - started) * 1000
            return reply
        raise KeyError(f"model {model_id} is not in the {kind} pool")

    def _call_op(
        self, kind: str, deployment: str, model_id: str, message: dict[str, Any]
    ) -> dict[str, Any]:
        """An ``op`` request: the replica's socket, else Serve's handle (its methods)."""
        if self.direct:
            replica = self._direct_replica(kind, deployment, model_id)
            endpoint = replica.endpoint if replica is not None else None
            if endpoint is not None and self._fast_usable(endpoint):
                try:
                    return self._fast.request(endpoint, message, timeout_s=PREDICT_TIMEOUT_S)
                except FastPathUnavailable as error:
                    logger.info("replica socket unusable, using Serve: %s", error)
                    self._fast.forget(endpoint)
                    self._fast_failed[endpoint] = time.monotonic()
        handle = self._handle(kind, deployment, model_id)
        if message["op"] == "embed":
            call = handle.embed.remote(model_id, message["texts"], message["role"])
        elif message["op"] == "complete":
            call = handle.complete.remote(model_id, message)
        else:
            call = handle.search.remote(
                model_id, message["query"], message["k"], message.get("index", "")
            )
        result: dict[str, Any] = call.result(timeout_s=PREDICT_TIMEOUT_S)
        return result

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
        return ray_private.request_metadata(app=app_name(self.namespace, kind), model_id=model_id)

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
            routes: dict[str, Route] = handle.routes.remote().result(timeout_s=CONTROL_TIMEOUT_S)
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

    def _replica_stats(
        self, app: str, deployment: str | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """deployment -> the statistics of its live replicas (stale entries removed); of
        one deployment only when it is given."""
        import ray

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
        for key in ray_private.kv_list(scope):
            owner, replica_id = key[len(prefix) :].split("/", 1)
            if (owner, replica_id) not in live:
                ray_private.kv_del(key)
                continue
            value = ray_private.kv_get(key)
            if value is not None:
                found.setdefault(owner, []).append(json.loads(value))
        for stats in found.values():
            stats.sort(key=lambda s: s["replica_id"])
        return found
