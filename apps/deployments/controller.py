"""The fleet controller: the one process that talks to the serving backend.

Level-triggered, like a Kubernetes controller: every ``FLEET_RECONCILE_SECONDS``, and at
once when the desired state changes (services bump :class:`FleetLease`'s ``generation``),
:meth:`Controller.reconcile` compares what the database says should be live with what the
fleet reports, and closes the difference:

- the cluster is gone -> reconnect (embedded mode: start a new Ray head);
- a pool the fleet lost, or whose content differs from the desired one -> apply it;
- a pending deployment -> loading; a loading one whose model every replica holds ->
  verified warm-up -> warm (or failed); one without progress -> retried, then failed;
- a warm deployment no replica serves -> ``degraded`` (audited, alerted); a degraded one
  served again -> verified warm-up -> warm;
- a replica that came back -> re-warm its models; warm-ups due by schedule or asked for;
- alerts whose condition cleared -> resolved.

Then it publishes what it saw on each :class:`ServingPool` (the routing table web and worker
processes send predicts by, and the public status the fleet page shows), so nobody else
needs a connection to the backend. Running any pass again is safe: every step reads the
current state first.

Exactly one controller acts at a time: it holds the :class:`FleetLease` row, renewed on
every step; a controller that cannot renew stops acting (another took over after it was
silent for ``FLEET_LEASE_SECONDS``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from apps.audit.services import audit_record
from apps.deployments import alerts, indexing, selectors, services
from apps.deployments.backends import get_backend, pool_spec
from apps.deployments.fleet import model_entries, pool_apply, pool_for, replicas_of
from apps.deployments.models import (
    AlertKind,
    Deployment,
    DeploymentStatus,
    FleetAlert,
    FleetLease,
    ServingPool,
    WarmupTrigger,
)
from worker.serving.specs import InsufficientCapacity, ServingBackend

log = logging.getLogger(__name__)

LEASE = "fleet"
EMBEDDING = "embedding"
RESTART_WINDOW_SECONDS = 3600
# A controller whose loop has not reconnected this long after its cluster went exits.
WATCHDOG_EXIT_S = 30.0
# ... and sooner when its loop has not turned for this long since then: it sits in a Ray
# call to the dead cluster, which would hold it until Ray ends the process (60 s); a
# fresh controller starts the new head at once. Not while the loop is connecting (a new
# embedded head takes ~20 s to start).
WATCHDOG_STUCK_S = 5.0
# Readiness answers that mean "not yet", not "broken".
_WAITING = ("timeout", "pending")


class LeaseLost(Exception):
    """Another controller holds the lease: this one must not act."""


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def lease_acquire(*, holder: str, seconds: float) -> bool:
    """Take or renew the lease; False while another holder's lease runs."""
    now = timezone.now()
    expires = now + timedelta(seconds=seconds)
    with contextlib.suppress(IntegrityError):  # created by a concurrent controller
        FleetLease.objects.get_or_create(pk=LEASE)
    renewed = FleetLease.objects.filter(pk=LEASE, holder=holder, expires_at__gt=now).update(
        expires_at=expires, heartbeat_at=now
    )
    if renewed:
        return True
    with transaction.atomic():
        lease = FleetLease.objects.select_for_update().get(pk=LEASE)
        if lease.holder and lease.holder != holder and lease.expires_at and lease.expires_at > now:
            return False
        previous = lease.holder
        lease.holder, lease.acquired_at = holder, now
        lease.expires_at, lease.heartbeat_at = expires, now
        lease.save(update_fields=["holder", "acquired_at", "expires_at", "heartbeat_at"])
        audit_record(
            actor=None,
            tenant=None,
            verb="fleet.controller_acquired",
            object_type="fleet_lease",
            object_id=LEASE,
            before={"holder": previous},
            after={"holder": holder},
            via="controller",
        )
    log.info("fleet controller lease acquired", extra={"holder": holder, "previous": previous})
    return True


def _lease_duration() -> timedelta:
    return timedelta(seconds=settings.FLEET_LEASE_SECONDS)


def lease_release(*, holder: str) -> None:
    FleetLease.objects.filter(pk=LEASE, holder=holder).update(expires_at=timezone.now())


def lease_is_fresh(*, holder: str | None = None, within_s: float | None = None) -> bool:
    """Whether a controller (``holder``, or any) renewed the lease recently: the
    controller's liveness check."""
    lease = FleetLease.objects.filter(pk=LEASE).first()
    if lease is None or lease.heartbeat_at is None or lease.expires_at is None:
        return False
    if holder is not None and lease.holder != holder:
        return False
    limit = within_s if within_s is not None else settings.FLEET_LEASE_SECONDS
    return bool(timezone.now() - lease.heartbeat_at < timedelta(seconds=limit))


def generation() -> int:
    value = FleetLease.objects.filter(pk=LEASE).values_list("generation", flat=True).first()
    return int(value or 0)


@dataclass
class PassReport:
    """What one pass did (logged, and returned to tests and benchmarks)."""

    connected: bool = True
    applied: list[str] = field(default_factory=list)
    went_live: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    warmups: int = 0
    retried: list[str] = field(default_factory=list)
    resolved_alerts: int = 0

    def changed(self) -> bool:
        return bool(
            self.applied
            or self.went_live
            or self.failed
            or self.degraded
            or self.recovered
            or self.retried
        )


class Controller:
    """The reconcile loop (see the module docstring)."""

    def __init__(self, *, holder: str | None = None, backend: ServingBackend | None = None):
        self.holder = holder or default_holder()
        self._backend = backend
        self._stop = threading.Event()
        # Pools to apply on the next pass whatever the fleet says (a retried load).
        self._force: set[str] = set()
        # When the loop last made progress (its health check reads it).
        self.last_turn = time.monotonic()
        # The loop is (re)connecting to the cluster: slow, not stuck.
        self._connecting = False

    @property
    def backend(self) -> ServingBackend:
        if self._backend is None:
            self._backend = get_backend()
        return self._backend

    # --- the loop ------------------------------------------------------------------

    def run(self, *, passes: int | None = None) -> None:
        """Hold the lease and reconcile until :meth:`stop` (or ``passes`` passes)."""
        seen_generation: int | None = None
        next_pass = 0.0
        done = 0
        watchdog = threading.Thread(target=self._watch_cluster, name="fleet-watchdog", daemon=True)
        watchdog.start()
        while not self._stop.is_set():
            self.last_turn = time.monotonic()
            try:
                if not lease_acquire(holder=self.holder, seconds=settings.FLEET_LEASE_SECONDS):
                    self._stop.wait(1.0)  # standby: another controller acts
                    continue
                current = generation()
                if current != seen_generation or time.monotonic() >= next_pass:
                    seen_generation = current
                    self.reconcile()
                    next_pass = time.monotonic() + settings.FLEET_RECONCILE_SECONDS
                    done += 1
                    if passes is not None and done >= passes:
                        return
            except LeaseLost:
                log.warning("fleet controller lost its lease", extra={"holder": self.holder})
            except Exception as error:  # a pass that failed is retried, never fatal
                log.exception("fleet controller pass failed")
                FleetLease.objects.filter(pk=LEASE, holder=self.holder).update(
                    last_error=f"{type(error).__name__}: {error}"[:2000]
                )
                self._stop.wait(1.0)
            self._stop.wait(0.2)
        lease_release(holder=self.holder)

    def stop(self) -> None:
        self._stop.set()

    def _watch_cluster(self) -> None:
        """Beside the loop, every second: is the cluster this process drives gone? Then say
        so at once (deployments degraded, routes withdrawn), whatever the loop is doing;
        and if the loop, not connecting, has not turned for WATCHDOG_STUCK_S since (it sits
        in a Ray call to the dead cluster, which Ray ends by killing the process after
        60 s anyway) or has not reconnected within WATCHDOG_EXIT_S, exit, so that the
        process manager starts a fresh controller, which starts or finds the new head."""
        from django.db import connection

        lost_since: float | None = None
        try:
            while not self._stop.wait(1.0):
                try:
                    lost = self._backend is not None and self._backend.lost()
                except Exception:
                    log.debug("could not tell whether the cluster is up", exc_info=True)
                    continue
                if not lost:
                    lost_since = None
                    continue
                if lost_since is None:
                    lost_since = time.monotonic()
                    log.warning("the serving cluster is gone", extra={"holder": self.holder})
                    try:
                        if lease_acquire(holder=self.holder, seconds=settings.FLEET_LEASE_SECONDS):
                            self._fleet_lost(
                                PassReport(), "the serving fleet was lost (its cluster is gone)"
                            )
                    except Exception:
                        log.exception("could not record the lost fleet")
                elif not self._connecting and self._stuck_on_lost(lost_since):
                    log.error("fleet controller stuck on a lost cluster; exiting to be restarted")
                    lease_release(holder=self.holder)
                    os._exit(75)
        finally:
            connection.close()

    def _stuck_on_lost(self, lost_since: float) -> bool:
        now = time.monotonic()
        stalled = now - max(self.last_turn, lost_since) > WATCHDOG_STUCK_S
        return stalled or now - lost_since > WATCHDOG_EXIT_S

    def _renew(self) -> None:
        self.last_turn = time.monotonic()
        if not lease_acquire(holder=self.holder, seconds=settings.FLEET_LEASE_SECONDS):
            raise LeaseLost(self.holder)

    # --- one pass ------------------------------------------------------------------

    def reconcile(self) -> PassReport:
        started = time.perf_counter()
        report = PassReport()
        self._renew()
        if self.backend.lost():
            # Say so before reconnecting (starting a new embedded head takes a while):
            # nothing is served now, and every page and predict should know it.
            self._fleet_lost(report, "the serving fleet was lost (its cluster is gone)")
        self._connecting = True
        try:
            report.connected = self.backend.ensure_connected()
        finally:
            self._connecting = False
            self.last_turn = time.monotonic()
        kinds = set(ServingPool.objects.values_list("kind", flat=True))
        kinds |= set(
            selectors.fleet_deployments_all().values_list(
                "model_version__registered_model__kind", flat=True
            )
        )
        for kind in sorted(kinds):
            self._renew()
            self._reconcile_pool(kind, report)
        FleetLease.objects.filter(pk=LEASE, holder=self.holder).update(
            last_pass_at=timezone.now(),
            last_pass_ms=(time.perf_counter() - started) * 1000,
            last_error="" if report.connected else "the serving backend does not answer",
        )
        if report.changed():
            log.info("fleet reconciled", extra={"report": report.__dict__})
        return report

    def _reconcile_pool(self, kind: str, report: PassReport) -> None:
        pool_for(kind)
        pending = Deployment.objects.filter(
            model_version__registered_model__kind=kind, status=DeploymentStatus.PENDING
        )
        if kind == EMBEDDING:
            report.failed += indexing.watch_builds()
            pending = pending.exclude(index_sha256="")  # its index is still being built
        for deployment_id in pending.values_list("pk", flat=True):
            claimed = services.deployment_claim(deployment_id=deployment_id)
            if claimed is not None and claimed.status == DeploymentStatus.FAILED:
                report.failed.append(claimed.pk)
        if not report.connected:
            self._fleet_lost(report, "the serving fleet does not answer", kinds=[kind])
            return
        snapshot = self.backend.snapshot()
        if self.backend.lost():  # went while we looked: applying now would block on it
            self._fleet_lost(report, "the serving fleet was lost (its cluster is gone)")
            return
        if self._needs_apply(kind, snapshot):
            self._apply(kind, report)
            snapshot = self.backend.snapshot()
        pool_status = next((p for p in snapshot["pools"] if p.get("kind") == kind), None)
        self._publish(kind, pool_status or {}, snapshot.get("routing", {}).get(kind, {}))
        rewarm = self._watch_replicas(kind, pool_status or {}, report)
        active = [
            *self._deployments(kind, DeploymentStatus.LOADING),
            *self._deployments(kind, DeploymentStatus.WARM),
            *self._deployments(kind, DeploymentStatus.DEGRADED),
        ]
        if not active:
            return
        ids = sorted({d.model_version_id for d in active})
        loading_ids = [d.model_version_id for d in active if d.status == DeploymentStatus.LOADING]
        ready = self.backend.wait_ready(kind, loading_ids, timeout_s=0) if loading_ids else {}
        served = self.backend.serving(kind, ids)
        for deployment in active:
            self._renew()
            if deployment.status == DeploymentStatus.LOADING:
                self._step_loading(deployment, ready.get(deployment.model_version_id), report)
            elif deployment.status == DeploymentStatus.WARM:
                if deployment.staged_index_sha256:
                    self._step_reindex(deployment, pool_status or {}, report)
                self._step_warm(deployment, served.get(deployment.model_version_id), rewarm, report)
            else:
                self._step_degraded(deployment, served.get(deployment.model_version_id), report)

    def _fleet_lost(self, report: PassReport, reason: str, kinds: list[str] | None = None) -> None:
        """Nothing of these pools (all, by default) is served: routes withdrawn (predicts
        answer 503 at once), warm deployments degraded."""
        for kind in kinds or list(ServingPool.objects.values_list("kind", flat=True)):
            self._publish(kind, {}, {})
            for deployment in self._deployments(kind, DeploymentStatus.WARM):
                services.deployment_degrade(deployment=deployment, reason=reason)
                report.degraded.append(deployment.pk)

    def _deployments(self, kind: str, status: str) -> list[Deployment]:
        return list(
            Deployment.objects.filter(model_version__registered_model__kind=kind, status=status)
            .select_related("model_version__registered_model", "tenant", "promotion")
            .order_by("created_at", "id")
        )

    # --- applying --------------------------------------------------------------------

    def _needs_apply(self, kind: str, snapshot: dict[str, Any]) -> bool:
        """The fleet's content differs from the desired one (or a retry asks for it)."""
        if kind in self._force:
            return True
        desired = {spec.model_id: spec for spec in selectors.desired_models(kind)}
        routing = snapshot.get("routing", {})
        pool_status = next((p for p in snapshot["pools"] if p.get("kind") == kind), None)
        if not routing and pool_status is not None:
            # A backend that routes by itself (SageMaker): compare the models it lists.
            listed = set(pool_status.get("models") or [])
            return listed != set(desired)
        held = (routing.get(kind) or {}).get("models") or {}
        if set(held) != set(desired):
            return True
        for model_id, spec in desired.items():
            route = held[model_id]
            on_tail = str(route.get("deployment", "")).endswith("-tail")
            if route.get("sha256") != spec.sha256 or on_tail == spec.pinned:
                return True
            if (
                route.get("index_sha256", "") != spec.index_sha256
                or route.get("staged_index_sha256", "") != spec.staged_index_sha256
            ):
                return True  # an embedding model's index changed (a reindex)
        if desired and pool_status is not None:
            pool = ServingPool.objects.get(kind=kind)
            wanted = pool_spec(pool)
            seen = pool_status.get("pool") or {}
            for name in ("replica_memory_bytes", "max_sets", "tail_memory_bytes",
                         "min_replicas", "max_replicas"):  # fmt: skip
                if name in seen and seen[name] != getattr(wanted, name):
                    return True
        return False

    def _apply(self, kind: str, report: PassReport) -> None:
        """Apply the pool; when the pinned models do not fit, fail the deployments being
        loaded (newest first) until they do — what serves already keeps serving."""
        while True:
            try:
                pool_apply(kind=kind, backend=self.backend)
            except InsufficientCapacity as error:
                loading = self._deployments(kind, DeploymentStatus.LOADING)
                if not loading:
                    log.error("the pool's live models do not fit", extra={"pool": kind})
                    self._force.discard(kind)
                    return
                victim = loading[-1]
                services.deployment_fail(deployment=victim, reason=str(error))
                report.failed.append(victim.pk)
                continue
            except Exception as error:
                log.exception("applying the pool failed", extra={"pool": kind})
                for deployment in self._deployments(kind, DeploymentStatus.LOADING):
                    if deployment.load_attempts >= settings.DEPLOYMENT_LOAD_ATTEMPTS:
                        services.deployment_fail(
                            deployment=deployment, reason=f"the fleet refused the change: {error}"
                        )
                        report.failed.append(deployment.pk)
                return
            self._force.discard(kind)
            report.applied.append(kind)
            return

    def _publish(self, kind: str, pool_status: dict[str, Any], routing: dict[str, Any]) -> None:
        """Publish what the fleet serves — fenced by the lease: only while no other
        controller has taken it over. The lease row stays locked until the routes are
        written, so a controller that was taken over (paused past its lease, then woken
        with what it saw before) cannot overwrite the new holder's routing table; it
        raises LeaseLost instead. (Its own lease run out during a long apply, with nobody
        taking over, is renewed: the routes it saw are still the fleet's.)"""
        now = timezone.now()
        with transaction.atomic():
            held = FleetLease.objects.select_for_update().filter(pk=LEASE, holder=self.holder)
            if not held.update(heartbeat_at=now, expires_at=now + _lease_duration()):
                raise LeaseLost(self.holder)
            ServingPool.objects.filter(kind=kind).update(
                routes=routing, observed=pool_status, observed_at=now
            )

    # --- deployments -----------------------------------------------------------------

    def _step_loading(
        self, deployment: Deployment, outcome: str | None, report: PassReport
    ) -> None:
        if outcome is None:
            warmup = services.warmup_run(
                deployment=deployment, trigger=WarmupTrigger.DEPLOY, backend=self.backend
            )
            report.warmups += 1
            if warmup.ok:
                services.deployment_go_live(deployment=deployment)
                report.went_live.append(deployment.pk)
            else:
                services.deployment_fail(
                    deployment=deployment, reason=f"warm-up failed: {warmup.error}"
                )
                report.failed.append(deployment.pk)
            return
        if outcome not in _WAITING and outcome != "not in pool":
            version = deployment.model_version
            alerts.alert_raise(
                tenant=deployment.tenant,
                deployment=deployment,
                kind=AlertKind.LOAD_FAILING,
                message=f"{version} failed to load: {outcome}",
            )
            services.deployment_fail(
                deployment=deployment, reason=f"the model failed to load: {outcome}"
            )
            report.failed.append(deployment.pk)
            return
        started = deployment.claimed_at or deployment.created_at
        if timezone.now() - started > timedelta(seconds=settings.DEPLOYMENT_LOAD_TIMEOUT_SECONDS):
            result = services.deployment_load_retry(deployment=deployment, outcome=outcome)
            if result.status == DeploymentStatus.FAILED:
                report.failed.append(deployment.pk)
            else:
                self._force.add(deployment.model_version.registered_model.kind)
                report.retried.append(deployment.pk)

    def _step_warm(
        self, deployment: Deployment, served: str | None, rewarm: set[str], report: PassReport
    ) -> None:
        if served is not None:
            services.deployment_degrade(deployment=deployment, reason=served)
            report.degraded.append(deployment.pk)
            return
        trigger = self._warmup_due(deployment, rewarm)
        if trigger is not None:
            services.warmup_run(deployment=deployment, trigger=trigger, backend=self.backend)
            report.warmups += 1
        report.resolved_alerts += alerts.alerts_resolve(
            deployment=deployment, kind=AlertKind.LOAD_FAILING
        )

    def _step_reindex(
        self, deployment: Deployment, pool_status: dict[str, Any], report: PassReport
    ) -> None:
        """A reindex: once every replica serving the model holds the staged index, verify
        it with a warm-up against its own reference, then switch to it; the served index
        answers searches until then. One that fails to load or verify is dropped."""
        staged = deployment.staged_index_sha256
        model_id = deployment.model_version_id
        holding, failed = _staged_index_state(pool_status, model_id, staged)
        if not holding and not failed and not _loaded_anywhere(pool_status, model_id):
            # A long-tail model no replica holds right now: the warm-up's first search
            # loads it with both indexes, once the pool's routes name the staged one.
            routes = ServingPool.objects.filter(kind=EMBEDDING).values_list("routes", flat=True)
            route = ((routes.first() or {}).get("models") or {}).get(model_id) or {}
            holding = route.get("staged_index_sha256") == staged
        if failed:
            indexing.reindex_fail(
                deployment=deployment, reason=f"the new index failed to load: {failed}"
            )
            report.failed.append(deployment.pk)
            return
        if not holding:
            return  # not loaded everywhere yet: the next pass looks again
        warmup = services.warmup_run(
            deployment=deployment, trigger=WarmupTrigger.REINDEX, backend=self.backend, staged=True
        )
        report.warmups += 1
        if warmup.ok:
            indexing.index_switch(deployment=deployment, warmup=warmup)
            report.went_live.append(deployment.pk)
        else:
            indexing.reindex_fail(deployment=deployment, reason=f"warm-up failed: {warmup.error}")
            report.failed.append(deployment.pk)
        deployment.refresh_from_db()

    def _step_degraded(
        self, deployment: Deployment, served: str | None, report: PassReport
    ) -> None:
        if served is not None:
            return  # still not served: the apply above is what can bring it back
        warmup = services.warmup_run(
            deployment=deployment, trigger=WarmupTrigger.RECOVERY, backend=self.backend
        )
        report.warmups += 1
        if warmup.ok:
            services.deployment_recover(deployment=deployment, warmup=warmup)
            report.recovered.append(deployment.pk)

    def _warmup_due(self, deployment: Deployment, rewarm: set[str]) -> str | None:
        if deployment.model_version_id in rewarm:
            return WarmupTrigger.REPLICA_RESTART
        last = deployment.last_warmup_at
        requested = deployment.warmup_requested_at
        if requested is not None and (last is None or requested > last):
            return WarmupTrigger.MANUAL
        if last is None or timezone.now() - last > timedelta(
            seconds=settings.DEPLOYMENT_REWARM_SECONDS
        ):
            return WarmupTrigger.SCHEDULE
        return None

    # --- replicas and alerts ---------------------------------------------------------

    def _watch_replicas(
        self, kind: str, pool_status: dict[str, Any], report: PassReport
    ) -> set[str]:
        """Compare the replicas with the last look: models of a replica that came back are
        re-warmed; a set whose replicas keep being replaced alerts (a scale-down or
        scale-up is not a restart); load-failure alerts open and close with the errors."""
        pool = ServingPool.objects.get(kind=kind)
        seen: dict[str, Any] = pool.replicas_seen or {}
        known: dict[str, str] = seen.get("replicas", {})
        restarts: dict[str, list[float]] = seen.get("restarts", {})
        now_replicas: dict[str, str] = {}
        rewarm: set[str] = set()
        failing: dict[str, str] = {}
        now = time.time()
        for set_name, replica in replicas_of(pool_status):
            replica_id = str(replica.get("replica_id"))
            now_replicas[replica_id] = set_name
            models = model_entries(replica)
            if known and replica_id not in known:
                rewarm.update(str(m["model_id"]) for m in models)
            for model in models:
                if model.get("error"):
                    failing.setdefault(
                        str(model["model_id"]),
                        f"model {model['model_id']} fails to load on replica {replica_id}: "
                        f"{model['error']}",
                    )
        for set_name in set(known.values()) | set(now_replicas.values()):
            gone = sum(1 for r, s in known.items() if s == set_name and r not in now_replicas)
            new = sum(1 for r, s in now_replicas.items() if s == set_name and r not in known)
            # A replica replaced by another is a restart; one only gone is a scale-down.
            restarts.setdefault(set_name, []).extend([now] * min(gone, new))
        restarting: dict[str, str] = {}
        for set_name, times in list(restarts.items()):
            recent = [t for t in times if now - t < RESTART_WINDOW_SECONDS]
            restarts[set_name] = recent
            if len(recent) >= settings.FLEET_RESTART_ALERT_COUNT:
                for model_id in _models_of_set(pool_status, set_name):
                    restarting[model_id] = (
                        f"replica set {set_name} restarted {len(recent)} times in the last hour"
                    )
        ServingPool.objects.filter(kind=kind).update(
            replicas_seen={"replicas": now_replicas, "restarts": restarts}
        )
        live = Deployment.objects.filter(
            model_version__registered_model__kind=kind,
            status__in=[DeploymentStatus.WARM, DeploymentStatus.DEGRADED],
        ).select_related("tenant")
        for deployment in live:
            model_id = deployment.model_version_id
            for alert_kind, open_now in (
                (AlertKind.LOAD_FAILING, failing),
                (AlertKind.REPLICA_RESTARTING, restarting),
            ):
                if model_id in open_now:
                    alerts.alert_raise(
                        tenant=deployment.tenant,
                        deployment=deployment,
                        kind=alert_kind,
                        message=open_now[model_id],
                    )
                else:
                    report.resolved_alerts += alerts.alerts_resolve(
                        deployment=deployment, kind=alert_kind
                    )
        # Alerts of deployments no longer live have nothing left to fix.
        stale = FleetAlert.objects.filter(resolved_at__isnull=True).filter(
            Q(deployment__status__in=[DeploymentStatus.RETIRED, DeploymentStatus.FAILED])
        )
        for alert in stale.select_related("deployment"):
            if alert.deployment is not None:
                report.resolved_alerts += alerts.alerts_resolve(
                    deployment=alert.deployment, kind=alert.kind
                )
        return rewarm


def _staged_index_state(
    pool_status: dict[str, Any], model_id: str, staged: str
) -> tuple[bool, str]:
    """(every replica that holds the model loaded has the staged index too, and at least
    one does; the first replica's error loading it, "")."""
    holders = 0
    for _, replica in replicas_of(pool_status):
        for model in model_entries(replica):
            if model.get("model_id") != model_id or not model.get("loaded"):
                continue
            if model.get("index_error"):
                return False, str(model["index_error"])
            if staged not in (model.get("indexes") or []):
                return False, ""
            holders += 1
    return holders > 0, ""


def _loaded_anywhere(pool_status: dict[str, Any], model_id: str) -> bool:
    return any(
        model.get("model_id") == model_id and model.get("loaded")
        for _, replica in replicas_of(pool_status)
        for model in model_entries(replica)
    )


def _models_of_set(pool_status: dict[str, Any], set_name: str) -> set[str]:
    return {
        str(m["model_id"])
        for name, replica in replicas_of(pool_status)
        if name == set_name
        for m in model_entries(replica)
    }


def inline_holder() -> str:
    """The lease holder of passes run inside another process (tests, benchmarks)."""
    return f"inline:{os.getpid()}"


def reconcile_until(
    predicate: Any, *, timeout_s: float = 120.0, controller: Controller | None = None
) -> Any:
    """Run passes in this process until ``predicate()`` is truthy (tests, benchmarks, the
    one-shot ``fleet_controller --once``); returns its value, or raises TimeoutError."""
    controller = controller or Controller(holder=inline_holder())
    deadline = time.monotonic() + timeout_s
    while True:
        controller.reconcile()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fleet did not converge within {timeout_s:g} s")
        time.sleep(0.3)
