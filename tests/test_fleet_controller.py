"""The fleet controller's own rules, on the database: one lease holder at a time and the
takeover of a dead one; what counts as a replica restart (a scale-down does not); alerts
that open with their condition and resolve themselves when it clears.

The replica observations fed to it here are the fleet's published status shape (what
``RayFleet.snapshot`` returns); the controller on a real Ray is in test_deployments_fleet.py
and, as its own process under faults, in test_fleet_faults.py."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.deployments import controller as fleet_controller
from apps.deployments.controller import Controller, PassReport, lease_acquire
from apps.deployments.models import Deployment, FleetAlert, FleetLease, ServingPool
from tests.test_deployments_api import deploy, make_version

pytestmark = pytest.mark.django_db


def test_one_holder_at_a_time_and_a_silent_one_is_taken_over(settings):
    assert lease_acquire(holder="a", seconds=15)
    assert not lease_acquire(holder="b", seconds=15)  # a's lease runs
    assert lease_acquire(holder="a", seconds=15)  # renewal
    # a goes silent: once its lease has run out, b takes over (audited) and a may not act.
    FleetLease.objects.filter(pk="fleet").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert lease_acquire(holder="b", seconds=15)
    assert FleetLease.objects.get(pk="fleet").holder == "b"
    taken = AuditEvent.objects.filter(verb="fleet.controller_acquired").order_by("created_at")
    assert [e.after["holder"] for e in taken] == ["a", "b"]
    assert taken.last().before == {"holder": "a"}
    with pytest.raises(fleet_controller.LeaseLost):
        Controller(holder="a")._renew()


def test_the_health_check_follows_the_heartbeat():
    assert not fleet_controller.lease_is_fresh()
    lease_acquire(holder="a", seconds=15)
    assert fleet_controller.lease_is_fresh(holder="a")
    assert not fleet_controller.lease_is_fresh(holder="b")
    FleetLease.objects.filter(pk="fleet").update(heartbeat_at=timezone.now() - timedelta(minutes=1))
    assert not fleet_controller.lease_is_fresh()


def replicas(*ids: str, error: str | None = None, model: str = "") -> dict[str, Any]:
    """A pool's published status with these replicas in set 0, each holding ``model``."""
    models = [{"model_id": model, "loaded": error is None, "error": error}] if model else []
    return {
        "kind": "classifier",
        "sets": [{"name": "classifier-set-0", "replicas": [
            {"replica_id": replica_id, "models": models} for replica_id in ids]}],
        "tail": {"name": "classifier-tail", "replicas": []},
    }  # fmt: skip


@pytest.fixture
def warm(scientist, tenant, artifacts_dir) -> Deployment:
    ServingPool.objects.create(kind="classifier", replica_memory_bytes=1, max_sets=1,
                               tail_memory_bytes=1, min_replicas=1, max_replicas=3)  # fmt: skip
    return deploy(make_version(scientist, tenant), "warm", warm_at=timezone.now())


def look(status: dict[str, Any]) -> tuple[set[str], PassReport]:
    report = PassReport()
    rewarm = Controller(holder="test")._watch_replicas("classifier", status, report)
    return rewarm, report


def restarts() -> int:
    seen = ServingPool.objects.get(kind="classifier").replicas_seen
    return sum(len(times) for times in seen.get("restarts", {}).values())


def test_a_scale_down_or_up_is_not_a_restart_and_a_replaced_replica_is(warm, settings):
    model = warm.model_version_id
    look(replicas("r1", "r2", model=model))
    look(replicas("r1", model=model))  # scaled down
    rewarm, _ = look(replicas("r1", "r3", model=model))  # scaled up: r3 is warmed up
    assert restarts() == 0 and rewarm == {model}
    rewarm, _ = look(replicas("r1", "r4", model=model))  # r3 replaced by r4
    assert restarts() == 1 and rewarm == {model}
    assert not FleetAlert.objects.exists()


def test_a_restart_loop_alerts_and_the_alert_resolves_once_it_stops(warm, settings):
    settings.FLEET_RESTART_ALERT_COUNT = 3
    model = warm.model_version_id
    for generation in range(4):
        look(replicas(f"r{generation}", model=model))
    (alert,) = FleetAlert.objects.filter(kind="replica_restarting", resolved_at__isnull=True)
    assert "restarted 3 times in the last hour" in alert.message
    # An hour later the restarts are out of the window: the alert resolves by itself.
    pool = ServingPool.objects.get(kind="classifier")
    old = time.time() - fleet_controller.RESTART_WINDOW_SECONDS - 1
    pool.replicas_seen["restarts"] = {"classifier-set-0": [old, old, old]}
    pool.save(update_fields=["replicas_seen"])
    _, report = look(replicas("r3", model=model))
    alert.refresh_from_db()
    assert alert.resolved_at is not None and report.resolved_alerts == 1
    assert AuditEvent.objects.filter(verb="alert.resolved", object_id=alert.pk).count() == 1


def test_a_load_failure_alert_opens_with_the_error_and_resolves_when_it_is_gone(warm):
    model = warm.model_version_id
    look(replicas("r1", model=model, error="sha256 mismatch"))
    (alert,) = FleetAlert.objects.filter(kind="load_failing", resolved_at__isnull=True)
    assert "sha256 mismatch" in alert.message and alert.deployment_id == warm.pk
    look(replicas("r1", model=model, error="sha256 mismatch"))  # still failing: one alert
    assert FleetAlert.objects.filter(kind="load_failing").count() == 1
    look(replicas("r1", model=model))
    alert.refresh_from_db()
    assert alert.resolved_at is not None


def test_alerts_of_a_deployment_no_longer_live_are_resolved(warm):
    FleetAlert.objects.create(tenant=warm.tenant, deployment=warm, kind="not_serving",
                              message="not served")  # fmt: skip
    Deployment.objects.filter(pk=warm.pk).update(status="retired")
    look(replicas("r1"))
    assert not FleetAlert.objects.filter(resolved_at__isnull=True).exists()


class _GoneCluster:
    """A backend whose cluster has gone (what RayFleet.lost() says once the head died)."""

    def lost(self) -> bool:
        return True


@pytest.mark.django_db(transaction=True)  # the watchdog thread has its own connection
def test_a_loop_stuck_on_a_lost_cluster_exits_within_seconds_not_while_it_connects(
    monkeypatch,
):
    """The head died and the loop sits in a call to it (Ray would hold it 60 s, then end
    the process): the watchdog exits the controller after WATCHDOG_STUCK_S so that a fresh
    one starts the new head at once — but never while the loop is starting that head."""
    monkeypatch.setattr(fleet_controller, "WATCHDOG_STUCK_S", 0.5)
    exits: list[float] = []

    def fake_exit(code: int) -> None:
        exits.append(time.monotonic())
        runner.stop()

    monkeypatch.setattr(fleet_controller.os, "_exit", fake_exit)
    runner = Controller(holder="w", backend=_GoneCluster())  # type: ignore[arg-type]
    runner._connecting = True  # the loop is starting a new head: slow, not stuck
    runner.last_turn = time.monotonic() - 60
    started = time.monotonic()
    watchdog = threading.Thread(target=runner._watch_cluster, daemon=True)
    watchdog.start()
    time.sleep(3.0)
    assert exits == []
    runner._connecting = False  # now the loop sits in a call to the dead cluster
    watchdog.join(timeout=10)
    assert len(exits) == 1
    assert exits[0] - started < fleet_controller.WATCHDOG_EXIT_S


def test_a_controller_that_was_taken_over_cannot_publish_its_routes():
    """Routes are fenced by the lease: a controller paused past its lease (then woken with
    what it saw before) must not overwrite the new holder's routing table."""
    ServingPool.objects.create(kind="classifier", replica_memory_bytes=1, max_sets=1,
                               tail_memory_bytes=1, min_replicas=1, max_replicas=1)  # fmt: skip
    old = {"models": {"mv_1": {"deployment": "classifier-set-0"}}, "endpoints": {}}
    new = {"models": {"mv_1": {"deployment": "classifier-set-1"}}, "endpoints": {}}
    assert lease_acquire(holder="a", seconds=15)
    Controller(holder="a")._publish("classifier", {"kind": "classifier"}, old)
    FleetLease.objects.filter(pk="fleet").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert lease_acquire(holder="b", seconds=15)
    Controller(holder="b")._publish("classifier", {"kind": "classifier"}, new)
    with pytest.raises(fleet_controller.LeaseLost):
        Controller(holder="a")._publish("classifier", {"kind": "classifier"}, old)
    assert ServingPool.objects.get(kind="classifier").routes == new
