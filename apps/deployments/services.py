"""Deployments: the verbs that make an approved model version live, and take it down.

pending -> loading -> warm | failed; warm -> retired; warm <-> degraded. An approved
promotion creates a deployment (:func:`deployment_create`) and moves to ``deploying``; the
fleet controller (:mod:`apps.deployments.controller`, the only process that talks to the
serving backend) claims it, pushes the pool's whole desired state, waits until every replica
holds the model, and warms it up (:func:`warmup_run`), then calls :func:`deployment_go_live`
or :func:`deployment_fail`. Only a warm deployment serves: the one it replaces keeps serving
until then (blue/green), and stays loaded as a standby afterwards so a rollback is quick.

Nothing here talks to the fleet: the verbs change rows and nudge the controller
(:func:`fleet_nudge`), which acts on the change at once.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import DomainError
from apps.deployments import alerts, completion, indexing, selectors
from apps.deployments.models import (
    ACTIVE,
    SERVING,
    Deployment,
    DeploymentStatus,
    FleetLease,
    Warmup,
)
from apps.evaluation.services import policy_for
from apps.promotions import services as promotions
from apps.promotions.models import PromotionRequest
from apps.registry.models import ModelKind
from worker.serving.specs import ModelLoadError, ServingBackend

log = logging.getLogger(__name__)

# Scores may differ in the last bits between the evaluating device and the serving one.
SCORE_TOLERANCE = 1e-3


def fleet_nudge() -> None:
    """Tell the fleet controller the desired state changed (after this transaction
    commits), so it acts now rather than at its next periodic pass."""

    def bump() -> None:
        FleetLease.objects.filter(pk="fleet").update(generation=F("generation") + 1)

    transaction.on_commit(bump)


def deployment_create(*, actor: Any, promotion: PromotionRequest, via: str = "") -> Deployment:
    """A deployment for an approved promotion; the promotion moves to ``deploying``.

    Called inside the approval's transaction, so an approval without its deployment (or
    the reverse) never exists. A version already deployed (and not retired or failed) in
    that environment is refused, and the approval with it: a version is deployed once per
    environment.
    """
    version = promotion.model_version
    active = Deployment.objects.filter(
        model_version=version, environment=promotion.target, status__in=ACTIVE
    ).first()
    if active is not None:
        raise DomainError(
            f"{version.registered_model.name} v{version.number} is already deployed to "
            f"{promotion.target} ({active.pk}, {active.status}); retire it first.",
            code="already_deployed",
            status=active.status,
        )
    deployment = Deployment.objects.create(
        tenant=promotion.tenant,
        model_version=version,
        environment=promotion.target,
        artifact_sha256=promotion.artifact_sha256,
        promotion=promotion,
        replaces=selectors.current_deployment(version, promotion.target),
        created_by=actor,
        corpus=indexing.shared_knowledge_base(version),
    )
    promotions.promotion_deploying(promotion=promotion, deployment_id=deployment.pk)
    if version.registered_model.kind == ModelKind.EMBEDDING:
        indexing.index_request(deployment)  # claimed once its index exists
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
    fleet_nudge()
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
        corpus_id=target.corpus_id,
        # An embedding version comes back with the index it served (still in the store,
        # bound by its sha256): a rollback is a warm-up, not a rebuild.
        index_key=target.index_key,
        index_sha256=target.index_sha256,
        index_size_bytes=target.index_size_bytes,
        index_documents=target.index_documents,
        index_dataset_version_id=target.index_dataset_version_id,
    )
    if target.model_version.registered_model.kind == ModelKind.EMBEDDING and not (
        target.index_sha256
    ):
        indexing.index_request(rollback)
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="deployment.rollback",
        obj=rollback,
        before={"deployment": locked.pk, "model_version": locked.model_version_id},
        after={"deployment": rollback.pk, "model_version": target.model_version_id},
        via=via,
    )
    fleet_nudge()
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
    fleet_nudge()  # the controller unloads it
    return locked


@transaction.atomic
def deployment_warmup_request(*, actor: Any, deployment: Deployment, via: str = "") -> Deployment:
    """Ask for a warm-up of a warm (or degraded) deployment now (the dashboard's button);
    the fleet controller runs it."""
    locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if locked.status not in SERVING:
        raise DomainError(
            f"This deployment is {locked.status}; only a warm deployment is re-warmed.",
            code="illegal_transition",
            status=locked.status,
        )
    locked.warmup_requested_at = timezone.now()
    locked.save(update_fields=["warmup_requested_at"])
    audit_record(
        actor=actor,
        tenant=deployment.tenant,
        verb="deployment.warmup_requested",
        obj=deployment,
        via=via,
    )
    fleet_nudge()
    return locked


def deployment_claim(*, deployment_id: str) -> Deployment | None:
    """pending -> loading (the controller's first load attempt). Conditional update: a
    deployment is claimed once, whatever runs twice."""
    claimed = Deployment.objects.filter(pk=deployment_id, status=DeploymentStatus.PENDING).update(
        status=DeploymentStatus.LOADING, claimed_at=timezone.now(), load_attempts=1
    )
    if not claimed:
        return None
    deployment = Deployment.objects.select_related(
        "model_version__registered_model", "tenant", "promotion"
    ).get(pk=deployment_id)
    if deployment.model_version.sha256 != deployment.artifact_sha256:
        return deployment_fail(
            deployment=deployment,
            reason="the model's bytes changed since they were approved; refusing to serve them",
        )
    return deployment


def deployment_load_retry(*, deployment: Deployment, outcome: str) -> Deployment:
    """A load attempt made no progress within DEPLOYMENT_LOAD_TIMEOUT_SECONDS: try again
    (the controller re-applies the pool), or fail with the reason after the last attempt."""
    attempts = deployment.load_attempts
    if attempts >= settings.DEPLOYMENT_LOAD_ATTEMPTS:
        return deployment_fail(
            deployment=deployment,
            reason=f"the model was not loaded after {attempts} attempts of "
            f"{settings.DEPLOYMENT_LOAD_TIMEOUT_SECONDS} s each (last: {outcome})",
        )
    Deployment.objects.filter(pk=deployment.pk, status=DeploymentStatus.LOADING).update(
        claimed_at=timezone.now(), load_attempts=attempts + 1
    )
    deployment.load_attempts = attempts + 1
    log.warning(
        "deployment load retried",
        extra={"deployment": deployment.pk, "attempt": attempts + 1, "outcome": outcome},
    )
    return deployment


@transaction.atomic
def deployment_degrade(*, deployment: Deployment, reason: str) -> Deployment | None:
    """warm -> degraded: the fleet is not serving it (replicas gone, the fleet lost the
    model, or the fleet does not answer). Visible everywhere, alerted; it is warm again
    only after a verified warm-up (:func:`deployment_recover`)."""
    locked = Deployment.objects.select_for_update().filter(pk=deployment.pk).first()
    if locked is None or locked.status != DeploymentStatus.WARM:
        return locked
    locked.status = DeploymentStatus.DEGRADED
    locked.degraded_at = timezone.now()
    locked.failure = reason[-4000:]
    locked.save(update_fields=["status", "degraded_at", "failure"])
    audit_record(
        actor=None,
        tenant=locked.tenant,
        verb="deployment.degraded",
        obj=locked,
        before={"status": DeploymentStatus.WARM},
        after={"status": locked.status, "reason": reason[:1000]},
        via="controller",
    )
    alerts.alert_raise(
        tenant=locked.tenant,
        deployment=locked,
        kind="not_serving",
        message=f"{locked.model_version} ({locked.environment}) is not being served: {reason}",
    )
    return locked


@transaction.atomic
def deployment_recover(*, deployment: Deployment, warmup: Warmup) -> Deployment | None:
    """degraded -> warm, after ``warmup`` (a passing one) came back from the fleet."""
    locked = Deployment.objects.select_for_update().filter(pk=deployment.pk).first()
    if locked is None or locked.status != DeploymentStatus.DEGRADED or not warmup.ok:
        return locked
    down_since = locked.degraded_at
    locked.status = DeploymentStatus.WARM
    locked.degraded_at = None
    locked.failure = ""
    locked.save(update_fields=["status", "degraded_at", "failure"])
    audit_record(
        actor=None,
        tenant=locked.tenant,
        verb="deployment.recovered",
        obj=locked,
        before={"status": DeploymentStatus.DEGRADED},
        after={
            "status": locked.status,
            "warmup": warmup.pk,
            "degraded_seconds": round((timezone.now() - down_since).total_seconds(), 1)
            if down_since
            else None,
        },
        via="controller",
    )
    alerts.alerts_resolve(deployment=locked, kind="not_serving")
    return locked


@transaction.atomic
def deployment_go_live(*, deployment: Deployment) -> Deployment:
    """The warm-up passed: this deployment serves, the one it replaces steps down to a
    standby (still loaded, for a quick rollback), its promotion is done. The controller
    moves the replaced version from the pinned sets to the long-tail tier next."""
    locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
    now = timezone.now()
    previous = list(
        Deployment.objects.select_for_update()
        .filter(
            model_version__registered_model=deployment.model_version.registered_model_id,
            environment=locked.environment,
        )
        .filter(Q(status__in=SERVING) | Q(standby=True))
        .exclude(pk=locked.pk)
    )
    for old in previous:
        was = old.status
        # Only the deployment just replaced stays loaded; older standbys are let go.
        old.standby = was in SERVING and old.model_version_id != locked.model_version_id
        old.status = DeploymentStatus.RETIRED
        old.retired_at = old.retired_at or now
        old.save(update_fields=["status", "standby", "retired_at"])
        if was in SERVING:
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
        promotions.promotion_deployed(promotion_id=locked.promotion_id, deployment_id=locked.pk)
    audit_record(
        actor=None,
        tenant=locked.tenant,
        verb="deployment.warm",
        obj=locked,
        before={"status": DeploymentStatus.LOADING},
        after={"status": locked.status, "last_warmup_ms": locked.last_warmup_ms},
        via="controller",
    )
    fleet_nudge()
    return locked


def deployment_fail(*, deployment: Deployment, reason: str) -> Deployment:
    """The deployment failed; whatever served before keeps serving (the controller unloads
    what this one added)."""
    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        before = locked.status
        locked.status = DeploymentStatus.FAILED
        locked.failure = reason[-4000:]
        locked.save(update_fields=["status", "failure"])
        if locked.promotion_id is not None:
            promotions.promotion_deploy_failed(
                promotion_id=locked.promotion_id, deployment_id=locked.pk, reason=reason
            )
        audit_record(
            actor=None,
            tenant=locked.tenant,
            verb="deployment.failed",
            obj=locked,
            before={"status": before},
            after={"status": locked.status, "failure": reason},
            via="controller",
        )
        fleet_nudge()
    return locked


def warmup_run(
    *, deployment: Deployment, trigger: str, backend: ServingBackend, staged: bool = False
) -> Warmup:
    """Send golden-set samples through the fleet one request at a time, the way customers
    call; pass if every prediction equals the evaluation's and the median latency is
    within the policy's budget. An embedding deployment's warm-up checks its index (or,
    ``staged``, the staged index of a reindex): see :func:`_embedding_checks`; an
    autocomplete deployment's, its greedy completions (see
    :func:`apps.deployments.completion.warmup_checks`)."""
    version = deployment.model_version
    kind = version.registered_model.kind
    policy = policy_for(tenant=deployment.tenant, model_kind=kind)
    warmup = Warmup.objects.create(
        deployment=deployment, trigger=trigger, latency_budget_ms=policy.latency_budget_ms
    )
    embedding = kind == ModelKind.EMBEDDING
    # Their checks are their own: no classifier predictions to compare.
    other = embedding or kind == ModelKind.AUTOCOMPLETE
    samples = [] if other else selectors.warmup_samples(version, settings.DEPLOYMENT_WARMUP_SAMPLES)
    latencies: list[float] = []
    mismatches: list[dict[str, Any]] = []
    error = ""
    try:
        if embedding:
            samples = _embedding_checks(deployment, backend, latencies, mismatches, staged=staged)
        elif kind == ModelKind.AUTOCOMPLETE:
            samples = completion.warmup_checks(
                deployment,
                backend,
                latencies,
                mismatches,
                limit=settings.DEPLOYMENT_WARMUP_SAMPLES,
            )
        elif not samples:
            raise ModelLoadError("no recorded predictions to warm up with")
        for sample in [] if other else samples:
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
            f"{len(mismatches)} of {len(samples)} "
            f"{'answers' if other else 'predictions'} differ from the evaluation's "
            f"(first: {mismatches[0]['text']!r} -> {mismatches[0]['got']}, "
            f"expected {mismatches[0]['expected']})"
        )
    budget = policy.latency_budget_ms
    if not error and budget is not None and p50 is not None and p50 > budget:
        per = " per token" if kind == ModelKind.AUTOCOMPLETE else ""
        error = f"median latency {p50:.1f} ms{per} is over the policy's budget of {budget:g} ms"
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
        what = f"the new index of {version}" if staged else str(version)
        kept = "; the previous index keeps serving" if staged else ""
        alerts.alert_raise(
            tenant=deployment.tenant,
            deployment=deployment,
            kind="warmup_failed",
            message=f"Warm-up of {what} ({deployment.environment}) failed{kept}: {error}",
        )
    return warmup


# Embeddings served equal the reference's when their cosine is at least this.
EMBEDDING_COSINE_MIN = 1 - 1e-4


def _embedding_checks(
    deployment: Deployment,
    backend: Any,
    latencies: list[float],
    mismatches: list[dict[str, Any]],
    *,
    staged: bool,
) -> list[Any]:
    """An embedding deployment's warm-up, against the reference its index artifact holds
    (computed in-process from the version's own artifact when the index was built, see
    :mod:`apps.deployments.indexing`): each golden query searched one at a time (the
    policy's latency budget applies to these), the top ids equal to the reference's; the
    golden queries' embeddings (query role) and the first documents' (document role) at a
    cosine of at least ``EMBEDDING_COSINE_MIN`` to the reference's; and the queries of the
    version's evaluation on the tenant's golden retrieval sets, where it recorded their
    embeddings, likewise, with their top 10 equal to the evaluation's where the golden
    set's knowledge base is the one indexed (same documents sha256). Returns the checks
    made; fills ``latencies`` and ``mismatches``."""
    import numpy as np

    from worker.serving.embedding import REFERENCE_K

    key, sha = (
        (deployment.staged_index_key, deployment.staged_index_sha256)
        if staged
        else (deployment.index_key, deployment.index_sha256)
    )
    if not sha:
        raise ModelLoadError("the deployment has no index to warm up with")
    if not hasattr(backend, "search") or not hasattr(backend, "embed"):
        raise ModelLoadError("this serving backend does not serve embedding models")
    index = indexing.index_of(key, sha)
    reference = index.reference
    if not reference.queries:
        raise ModelLoadError("the index holds no golden queries to warm up with")
    kind, model_id = ModelKind.EMBEDDING, deployment.model_version_id
    checks: list[Any] = []
    for query, expected in zip(reference.queries, reference.ids, strict=True):
        started = time.perf_counter()
        reply = backend.search(kind, model_id, query, REFERENCE_K, index=sha if staged else "")
        latencies.append((time.perf_counter() - started) * 1000)
        checks.append(query)
        got = [r["document_id"] for r in reply["results"]]
        if got != expected:
            mismatches.append(
                {
                    "text": query[:200],
                    "check": "search",
                    "expected": ", ".join(expected),
                    "got": ", ".join(got),
                }
            )

    def compare(texts: list[str], role: str, wanted: Any, what: str) -> None:
        if not texts:
            return
        reply = backend.embed(kind, model_id, texts, role)
        served = np.asarray(reply["embeddings"], dtype=np.float32)
        wanted = np.asarray(wanted, dtype=np.float32)
        if served.shape != wanted.shape:
            mismatches.append(
                {
                    "text": texts[0][:200],
                    "check": what,
                    "expected": f"shape {wanted.shape}",
                    "got": f"shape {served.shape}",
                }
            )
            return
        for text, cosine in zip(texts, (served * wanted).sum(axis=1).tolist(), strict=True):
            checks.append(text)
            if cosine < EMBEDDING_COSINE_MIN:
                mismatches.append(
                    {
                        "text": text[:200],
                        "check": what,
                        "expected": f"cosine >= {EMBEDDING_COSINE_MIN}",
                        "got": f"cosine {cosine:.6f}",
                    }
                )

    compare(reference.queries, "query", reference.vectors, "embed_query")
    documents = reference.documents
    compare(documents, "document", index.vectors[: len(documents)], "embed_document")
    source = deployment.staged_dataset_version if staged else deployment.index_dataset_version
    golden = selectors.embedding_warmup_queries(
        deployment.model_version,
        settings.DEPLOYMENT_WARMUP_SAMPLES,
        documents_sha256=source.documents_sha256 if source is not None else "",
    )
    compare([g["query"] for g in golden], "query", [g["embedding"] for g in golden], "evaluation")
    for sample in golden:
        if not sample["document_ids"]:
            continue  # evaluated against other documents than the index holds
        reply = backend.search(
            kind, model_id, sample["query"], REFERENCE_K, index=sha if staged else ""
        )
        checks.append(sample["query"])
        got = [r["document_id"] for r in reply["results"]]
        if got != sample["document_ids"][:REFERENCE_K]:
            mismatches.append(
                {
                    "text": sample["query"][:200],
                    "check": "evaluation_search",
                    "expected": ", ".join(sample["document_ids"][:REFERENCE_K]),
                    "got": ", ".join(got),
                }
            )
    return checks
