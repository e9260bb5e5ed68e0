"""The Ray Serve fleet's readiness and status: what each replica holds, whether a model
is ready or served, the public status and the routing snapshot the fleet controller
publishes. Part of :class:`worker.serving.fleet.RayFleet`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from worker.serving.fastpath import Endpoint
from worker.serving.ray_routing import CONTROL_TIMEOUT_S, RayRouting
from worker.serving.routing import (
    SERVE_NAMESPACE,
    ReplicaConfig,
    Route,
    app_name,
    replica_actor_prefix,
    set_deployment,
    tail_deployment,
)
from worker.serving.specs import (
    PoolSpec,
)

logger = logging.getLogger(__name__)

# How long wait_ready lets a model be missing from its pool's routing table (a change
# still reaching the tail replica) before answering "not in pool".
NOT_IN_POOL_AFTER_S = 15.0


class RayStatus(RayRouting):
    """Readiness and status (see the module docstring)."""

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
            config: ReplicaConfig | None = handle.config.remote().result(
                timeout_s=CONTROL_TIMEOUT_S
            )
        except Exception:
            return None
        return config

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
    return {
        **{k: stats.get(k) for k in keep},
        "bases": stats.get("bases", []),  # replicas of older code publish none
        "models": stats["models"],
    }


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
