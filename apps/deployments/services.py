"""Deployments: the verbs that make an approved model version live, and take it down.

pending -> loading -> warm | failed; warm -> retired. An approved promotion creates a
deployment (:func:`deployment_create`) and moves to ``deploying``; the ``deployments.load``
task claims it, pushes the pool's whole desired state to the serving backend
(:func:`apps.deployments.fleet.pool_apply`), waits for every replica to hold the model, and
warms it up. Only a warm deployment serves: the one it replaces keeps serving until then
(blue/green), and stays loaded as a standby afterwards so a rollback is quick.
"""

from __future__ import annotations

import logging
import statistics
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import DomainError
from apps.deployments import alerts, selectors
from apps.deployments.backends import get_backend
from apps.deployments.models import (
    Deployment,
    DeploymentStatus,
    Warmup,
    WarmupTrigger,
)
from apps.evaluation.services import policy_for
from apps.promotions.models import PromotionRequest, PromotionStatus
from worker.serving.specs import InsufficientCapacity, ModelLoadError

log = logging.getLogger(__name__)

# Scores may differ in the last bits between the evaluating device and the serving one.
SCORE_TOLERANCE = 1e-3


def _enqueue_load(deployment_id: str) -> None:
    from apps.deployments.tasks import load_deployment

    transaction.on_commit(lambda: load_deployment.delay(deployment_id))


def deployment_create(*, actor: Any, promotion: PromotionRequest, via: str = "") -> Deployment:
    """A deployment for an approved promotion; the promotion moves to ``deploying``.

    Called inside the approval's transaction, so an approval without its deployment (or
    the reverse) never exists.
    """
    version = promotion.model_version
    deployment = Deployment.objects.create(
        tenant=promotion.tenant,
        model_version=version,
        environment=promotion.target,
        artifact_sha256=promotion.artifact_sha256,
        promotion=promotion,
        replaces=selectors.current_deployment(version, promotion.target),
        created_by=actor,
    )
    PromotionRequest.objects.filter(pk=promotion.pk).update(status=PromotionStatus.DEPLOYING)
    promotion.status = PromotionStatus.DEPLOYING
    audit_record(
        actor=actor,
        tenant=promotion.tenant,
        verb="deployment.create",
        obj=deployment,
        after={
            "model_version": version.pk,
            "environment": deployment.environment,
            "artifact_sha256": deployment.artifact_sha256,
            "promotion": promotion.pk,
        },
        via=via,
    )
    _enqueue_load(deployment.pk)
    return deployment


@transaction.atomic
def deployment_rollback(*, actor: Any, deployment: Deployment, via: str = "") -> Deployment:
    """Put the version this warm deployment replaced back in service (it is still loaded
    as a standby, or is reloaded first); the current one serves until that is warm."""
    locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if locked.status != DeploymentStatus.WARM:
        raise DomainError(
            f"This deployment is {locked.status}; only the warm deployment can be rolled back.",
            code="illegal_transition",
            status=locked.status,
        )
    target = selectors.rollback_target(locked)
    if target is None:
        raise DomainError(
            "There is no earlier version of this model to roll back to.",
            code="no_previous_version",
            status=locked.status,
        )
    _refuse_if_busy(locked)
    rollback = Deployment.objects.create(
        tenant=locked.tenant,
        model_version=target.model_version,
        environment=locked.environment,
        artifact_sha256=target.artifact_sha256,
        replaces=locked,
        is_rollback=True,
        created_by=actor,
    )
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="deployment.rollback",
        obj=rollback,
        before={"deployment": locked.pk, "model_version": locked.model_version_id},
        after={"deployment": rollback.pk, "model_version": target.model_version_id},
        via=via,
    )
    _enqueue_load(rollback.pk)
    return rollback


def _refuse_if_busy(deployment: Deployment) -> None:
    busy = Deployment.objects.filter(
        model_version__registered_model=deployment.model_version.registered_model_id,
        environment=deployment.environment,
        status__in=[DeploymentStatus.PENDING, DeploymentStatus.LOADING],
    ).first()
    if busy is not None:
        raise DomainError(
            f"Deployment {busy.pk} of this model is {busy.status}; wait for it to finish.",
            code="deployment_in_progress",
            status=busy.status,
        )


@transaction.atomic
def deployment_retire(*, actor: Any, deployment: Deployment, via: str = "") -> Deployment:
    """Take a version off the fleet: it stops serving and is unloaded everywhere."""
    locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if locked.status in (DeploymentStatus.PENDING, DeploymentStatus.LOADING):
        raise DomainError(
            f"This deployment is {locked.status}; wait for it to finish before retiring it.",
            code="illegal_transition",
            status=locked.status,
        )
    if locked.status == DeploymentStatus.RETIRED and not locked.standby:
        raise DomainError(
            "This deployment is already retired.", code="illegal_transition", status=locked.status
        )
    before = {"status": locked.status, "standby": locked.standby}
    locked.status = DeploymentStatus.RETIRED
    locked.standby = False
    locked.retired_at = locked.retired_at or timezone.now()
    locked.save(update_fields=["status", "standby", "retired_at"])
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="deployment.retire",
        obj=locked,
        before=before,
        after={"status": locked.status, "standby": False},
        via=via,
    )
    kind = locked.model_version.registered_model.kind
    transaction.on_commit(lambda: _enqueue_apply(kind))
    return locked


def _enqueue_apply(kind: str) -> None:
    from apps.deployments.tasks import apply_pool

    apply_pool.delay(kind)


@transaction.atomic
def deployment_warmup_request(*, actor: Any, deployment: Deployment, via: str = "") -> Deployment:
    """Ask for a warm-up of a warm deployment now (the dashboard's button)."""
    if deployment.status != DeploymentStatus.WARM:
        raise DomainError(
            f"This deployment is {deployment.status}; only a warm deployment is re-warmed.",
            code="illegal_transition",
            status=deployment.status,
        )
    audit_record(
        actor=actor,
        tenant=deployment.tenant,
        verb="deployment.warmup_requested",
        obj=deployment,
        via=via,
    )
    from apps.deployments.tasks import warm_deployment

    pk = deployment.pk
    transaction.on_commit(lambda: warm_deployment.delay(pk, WarmupTrigger.MANUAL))
    return deployment


def deployment_claim(*, deployment_id: str) -> Deployment | None:
    """Claim a deployment for loading: a pending one, or a loading one whose task died
    (its lease ran out). Conditional update, so two workers never load the same one."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.DEPLOYMENT_LEASE_SECONDS)
    claimed = Deployment.objects.filter(
        Q(status=DeploymentStatus.PENDING)
        | Q(status=DeploymentStatus.LOADING, claimed_at__lt=stale),
        pk=deployment_id,
    ).update(status=DeploymentStatus.LOADING, claimed_at=now)
    if not claimed:
        return None
    return Deployment.objects.select_related(
        "model_version__registered_model", "tenant", "promotion"
    ).get(pk=deployment_id)


def deployment_load(*, deployment_id: str) -> Deployment | None:
    """The whole of making a deployment live (the ``deployments.load`` task's body)."""
    from apps.deployments.fleet import pool_apply

    deployment = deployment_claim(deployment_id=deployment_id)
    if deployment is None:
        return None
    version = deployment.model_version
    if version.sha256 != deployment.artifact_sha256:
        return deployment_fail(
            deployment=deployment,
            reason="the model's bytes changed since they were approved; refusing to serve them",
        )
    kind = version.registered_model.kind
    try:
        pool_apply(kind=kind)
    except InsufficientCapacity as exc:
        return deployment_fail(deployment=deployment, reason=str(exc), reapply=False)
    except Exception as exc:
        log.exception("applying the pool failed", extra={"deployment": deployment_id})
        return deployment_fail(deployment=deployment, reason=f"the fleet refused the change: {exc}")
    errors = get_backend().wait_ready(
        kind, [version.pk], timeout_s=settings.DEPLOYMENT_LOAD_TIMEOUT_SECONDS
    )
    current = Deployment.objects.filter(pk=deployment.pk).first()
    if current is None or current.status != DeploymentStatus.LOADING:
        # Retired, failed or deleted while the pool changed: not this task's to finish.
        log.info("deployment no longer loading", extra={"deployment": deployment_id})
        return current
    if errors.get(version.pk):
        alerts.alert_raise(
            tenant=deployment.tenant,
            deployment=deployment,
            kind="load_failing",
            message=f"{version} failed to load: {errors[version.pk]}",
        )
        return deployment_fail(
            deployment=deployment, reason=f"the model failed to load: {errors[version.pk]}"
        )
    warmup = warmup_run(deployment=deployment, trigger=WarmupTrigger.DEPLOY)
    if not warmup.ok:
        return deployment_fail(deployment=deployment, reason=f"warm-up failed: {warmup.error}")
    return deployment_go_live(deployment=deployment)


@transaction.atomic
def deployment_go_live(*, deployment: Deployment) -> Deployment:
    """The warm-up passed: this deployment serves, the one it replaces steps down to a
    standby (still loaded, for a quick rollback), its promotion is done."""
    locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
    now = timezone.now()
    previous = list(
        Deployment.objects.select_for_update()
        .filter(
            model_version__registered_model=deployment.model_version.registered_model_id,
            environment=locked.environment,
        )
        .filter(Q(status=DeploymentStatus.WARM) | Q(standby=True))
        .exclude(pk=locked.pk)
    )
    for old in previous:
        was = old.status
        # Only the deployment just replaced stays loaded; older standbys are let go.
        old.standby = (
            was == DeploymentStatus.WARM and old.model_version_id != locked.model_version_id
        )
        old.status = DeploymentStatus.RETIRED
        old.retired_at = old.retired_at or now
        old.save(update_fields=["status", "standby", "retired_at"])
        if was == DeploymentStatus.WARM:
            audit_record(
                actor=None,
                tenant=old.tenant,
                verb="deployment.replaced",
                obj=old,
                before={"status": was},
                after={"status": old.status, "replaced_by": locked.pk, "standby": old.standby},
                via="task",
            )
    locked.status = DeploymentStatus.WARM
    locked.warm_at = now
    locked.failure = ""
    locked.save(update_fields=["status", "warm_at", "failure"])
    if locked.promotion_id is not None:
        PromotionRequest.objects.filter(
            pk=locked.promotion_id, status=PromotionStatus.DEPLOYING
        ).update(status=PromotionStatus.DONE)
    audit_record(
        actor=None,
        tenant=locked.tenant,
        verb="deployment.warm",
        obj=locked,
        before={"status": DeploymentStatus.LOADING},
        after={"status": locked.status, "last_warmup_ms": locked.last_warmup_ms},
        via="task",
    )
    kind = deployment.model_version.registered_model.kind
    # The replaced version moves from the pinned sets to the long-tail tier.
    transaction.on_commit(lambda: _enqueue_apply(kind))
    return locked


def deployment_fail(*, deployment: Deployment, reason: str, reapply: bool = True) -> Deployment:
    """The deployment failed; whatever served before keeps serving."""
    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        before = locked.status
        locked.status = DeploymentStatus.FAILED
        locked.failure = reason[-4000:]
        locked.save(update_fields=["status", "failure"])
        if locked.promotion_id is not None:
            PromotionRequest.objects.filter(
                pk=locked.promotion_id, status=PromotionStatus.DEPLOYING
            ).update(status=PromotionStatus.FAILED, failure=reason[-4000:])
        audit_record(
            actor=None,
            tenant=locked.tenant,
            verb="deployment.failed",
            obj=locked,
            before={"status": before},
            after={"status": locked.status, "failure": reason},
            via="task",
        )
    if reapply:
        # Unload what this deployment added (a no-op for the backend when it never loaded).
        from apps.deployments.fleet import pool_apply

        try:
            pool_apply(kind=deployment.model_version.registered_model.kind)
        except Exception:
            log.exception("re-applying the pool after a failure failed")
    return locked


def warmup_run(*, deployment: Deployment, trigger: str) -> Warmup:
    """Send golden-set samples through the fleet one request at a time, the way customers
    call; pass if every prediction equals the evaluation's and the median latency is
    within the policy's budget."""
    version = deployment.model_version
    kind = version.registered_model.kind
    policy = policy_for(tenant=deployment.tenant, model_kind=kind)
    warmup = Warmup.objects.create(
        deployment=deployment, trigger=trigger, latency_budget_ms=policy.latency_budget_ms
    )
    samples = selectors.warmup_samples(version, settings.DEPLOYMENT_WARMUP_SAMPLES)
    latencies: list[float] = []
    mismatches: list[dict[str, Any]] = []
    error = ""
    backend = get_backend()
    try:
        if not samples:
            raise ModelLoadError("no recorded predictions to warm up with")
        for sample in samples:
            started = time.perf_counter()
            result = backend.predict(kind, version.pk, [sample["text"]])
            latencies.append((time.perf_counter() - started) * 1000)
            got = result.outputs[0]
            if got["label"] != sample["predicted"] or abs(got["score"] - sample["score"]) > (
                SCORE_TOLERANCE
            ):
                mismatches.append(
                    {
                        "text": sample["text"][:200],
                        "expected": sample["predicted"],
                        "expected_score": sample["score"],
                        "got": got["label"],
                        "got_score": got["score"],
                    }
                )
    except Exception as exc:  # a warm-up records why it failed, whatever the cause
        error = f"{type(exc).__name__}: {exc}"
    p50 = statistics.median(latencies) if latencies else None
    if not error and mismatches:
        error = (
            f"{len(mismatches)} of {len(samples)} predictions differ from the evaluation's "
            f"(first: {mismatches[0]['text']!r} -> {mismatches[0]['got']}, "
            f"expected {mismatches[0]['expected']})"
        )
    budget = policy.latency_budget_ms
    if not error and budget is not None and p50 is not None and p50 > budget:
        error = f"median latency {p50:.1f} ms is over the policy's budget of {budget:g} ms"
    warmup.ok = not error
    warmup.error = error
    warmup.samples = len(latencies)
    warmup.mismatches = mismatches[:20]
    warmup.latency_ms_p50 = p50
    warmup.latency_ms_max = max(latencies) if latencies else None
    warmup.finished_at = timezone.now()
    warmup.save()
    Deployment.objects.filter(pk=deployment.pk).update(
        last_warmup_at=warmup.finished_at, last_warmup_ms=p50
    )
    deployment.last_warmup_at, deployment.last_warmup_ms = warmup.finished_at, p50
    if warmup.ok:
        alerts.alerts_resolve(deployment=deployment, kind="warmup_failed")
    else:
        alerts.alert_raise(
            tenant=deployment.tenant,
            deployment=deployment,
            kind="warmup_failed",
            message=f"Warm-up of {version} ({deployment.environment}) failed: {error}",
        )
    return warmup


def warm_deployment(*, deployment_id: str, trigger: str) -> Warmup | None:
    deployment = (
        Deployment.objects.select_related("model_version__registered_model", "tenant")
        .filter(pk=deployment_id, status=DeploymentStatus.WARM)
        .first()
    )
    if deployment is None:
        return None
    return warmup_run(deployment=deployment, trigger=trigger)
