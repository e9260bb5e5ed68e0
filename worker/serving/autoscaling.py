"""The autoscaling policy of every replica set and tail: Serve's default (ongoing requests
per replica against ``target_ongoing_requests``) counting the requests that reached the
replicas through their own sockets (:mod:`worker.serving.fastpath`) as well as Serve's.

Serve counts the requests that go through its handles or its replica request path
(``total_num_requests``); the socket's requests it never sees, so each replica reports its
own as the custom metric :data:`FAST_ONGOING` (``ModelReplica.record_autoscaling_stats``),
which Serve averages over ``look_back_period_s`` per replica. Serve wraps a custom policy
with the deployment's bounds, delays and scaling factors, exactly as it does its default.
"""

from __future__ import annotations

from typing import Any

FAST_ONGOING = "workbench_fast_ongoing_requests"
POLICY = "worker.serving.autoscaling:fleet_policy"


def fleet_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Desired replicas: all ongoing requests over the target per replica."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    fast = sum((ctx.aggregated_metrics or {}).get(FAST_ONGOING, {}).values())
    ongoing = float(ctx.total_num_requests) + float(fast)
    return ongoing / ctx.config.get_target_ongoing_requests(), {}
