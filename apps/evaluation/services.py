"""Evaluations of model versions on golden sets, and promotion policies.

An evaluation's life: ``evaluation_request`` (queued, its task sent) -> a worker's
``evaluation_claim`` (running; ``attempt`` +1) -> heartbeats, each fenced by the attempt ->
``evaluation_finish`` (succeeded / failed). ``evaluations_requeue_stale`` is the way out of
the two waits: a running evaluation whose worker stopped heartbeating is re-queued (and
failed after ``EVALUATION_MAX_ATTEMPTS``), a queued one whose message was lost is sent again.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import InvalidInput
from apps.core.leases import queue_depth
from apps.datasets.models import DatasetKind, DatasetVersion, Task
from apps.evaluation.models import EvalStatus, Evaluation, PromotionPolicy
from apps.registry.models import ModelKind, ModelVersion
from apps.tenants.models import Tenant

DEFAULT_GATES: list[dict[str, Any]] = [
    {"metric": "macro_f1", "op": ">=", "value": 0.7, "dataset": None},
    {"metric": "latency_ms_p95", "op": "<=", "value": 50.0, "dataset": None},
]
# An embedding model: the StackFAQ anchors for the un-tuned MiniLM are recall@1
# 0.720, recall@5 0.885, MRR@10 0.794; these floors refuse a broken model, and the
# no-regression check (max_regression_vs_champion 0) asks a tuned one to do no worse than
# the champion (or, with none in production, the un-tuned base) on any of the four.
DEFAULT_EMBEDDING_GATES: list[dict[str, Any]] = [
    {"metric": "recall_at_1", "op": ">=", "value": 0.3, "dataset": None},
    {"metric": "recall_at_5", "op": ">=", "value": 0.5, "dataset": None},
    {"metric": "mrr_at_10", "op": ">=", "value": 0.4, "dataset": None},
    {"metric": "ndcg_at_10", "op": ">=", "value": 0.45, "dataset": None},
]
DEFAULT_EMBEDDING_MAX_REGRESSION = 0.0
RETRIEVAL_METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10")
# The metrics compared with the champion's under ``max_regression_vs_champion``, by kind.
REGRESSION_METRICS: dict[str, tuple[str, ...]] = {
    ModelKind.EMBEDDING: ("recall_at_1", "recall_at_5", "mrr_at_10", "ndcg_at_10"),
    ModelKind.AUTOCOMPLETE: ("next_word_top1",),
}
# What ``latency_budget_ms`` bounds, by kind: an autocomplete model's budget is per token.
LATENCY_BUDGET_METRIC: dict[str, str] = {ModelKind.AUTOCOMPLETE: "latency_ms_per_token_p95"}
# The yardstick measured beside a version (``Evaluation.base_metrics``) that stands in for
# the champion on a set no production version was measured on, by kind, as gates name it.
BASE_YARDSTICK: dict[str, str] = {
    ModelKind.EMBEDDING: "un-tuned base",
    ModelKind.AUTOCOMPLETE: "trigram",
}
DEFAULT_REGRESSION_METRICS = ("macro_f1",)
RETRIEVAL_HEADLINE = ("recall_at_1", "recall_at_5", "mrr_at_10")
# An autocomplete model (worker.autocomplete_eval's definitions). The floor is the
# per-tenant word trigram's next-word top-1, 39-48 % on the shared SGD services: the floor
# of 0.35 refuses a broken model, and the no-regression check asks a learnt one to beat the
# champion's next-word top-1 (or, with none in production, the trigram fitted on its own
# training replies) on every set. Keystrokes saved: a tenth of the typing spared; latency:
# 50 ms a token keeps a 16-token suggestion under a second.
AUTOCOMPLETE_METRICS = (
    "next_word_top1",
    "next_word_top3",
    "exact_match",
    "keystrokes_saved",
    "perplexity",
)
AUTOCOMPLETE_LATENCY = ("latency_ms_per_token_p50", "latency_ms_per_token_p95")
# The metrics where less is better (every other gate metric: more is better).
LOWER_IS_BETTER = (
    "ece",
    "latency_ms_p50",
    "latency_ms_p95",
    "peak_memory_bytes",
    "perplexity",
    *AUTOCOMPLETE_LATENCY,
)
# Shares between 0 and 1: a gate on one asks for a value in that range.
SCORE_METRICS = (
    "accuracy",
    "macro_f1",
    *RETRIEVAL_METRICS,
    "next_word_top1",
    "next_word_top3",
    "exact_match",
    "keystrokes_saved",
)
DEFAULT_AUTOCOMPLETE_GATES: list[dict[str, Any]] = [
    {"metric": "next_word_top1", "op": ">=", "value": 0.35, "dataset": None},
    {"metric": "keystrokes_saved", "op": ">=", "value": 0.10, "dataset": None},
    {"metric": "latency_ms_per_token_p50", "op": "<=", "value": 50.0, "dataset": None},
]
DEFAULT_AUTOCOMPLETE_MAX_REGRESSION = 0.0
AUTOCOMPLETE_HEADLINE = ("next_word_top1", "keystrokes_saved", "exact_match")
GATE_METRICS = (
    "accuracy",
    "macro_f1",
    "ece",
    "latency_ms_p50",
    "latency_ms_p95",
    "peak_memory_bytes",
    *RETRIEVAL_METRICS,
    *AUTOCOMPLETE_METRICS,
    *AUTOCOMPLETE_LATENCY,
)
GATE_OPS = (">=", ">", "<=", "<", "==")
DEFAULT_GATES_BY_KIND: dict[str, list[dict[str, Any]]] = {
    ModelKind.EMBEDDING: DEFAULT_EMBEDDING_GATES,
    ModelKind.AUTOCOMPLETE: DEFAULT_AUTOCOMPLETE_GATES,
}
# The audit's headline numbers of a finished evaluation, by its metrics' task.
HEADLINE: dict[str, tuple[str, ...]] = {
    Task.RETRIEVAL: RETRIEVAL_HEADLINE,
    Task.TEXT_GENERATION: AUTOCOMPLETE_HEADLINE,
}
WHAT_TO_EVALUATE_ON: dict[str, str] = {
    Task.RETRIEVAL: "golden retrieval",
    Task.TEXT_GENERATION: "golden or sample reply",
}


def article(word: str) -> str:
    """ "a" or "an" before ``word`` ("an autocomplete model", "an embedding model")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def dataset_task(model_kind: str) -> str:
    """The task of the datasets a model of ``model_kind`` is measured on."""
    if model_kind == ModelKind.EMBEDDING:
        return Task.RETRIEVAL
    if model_kind == ModelKind.AUTOCOMPLETE:
        return Task.TEXT_GENERATION
    return Task.TEXT_CLASSIFICATION


def default_evaluation_versions(
    *, tenant: Tenant, model_kind: str = ModelKind.CLASSIFIER
) -> list[tuple[DatasetVersion, int | None]]:
    """The n+1 kinds of datasets a model must pass: the latest version of each of the
    tenant's golden sets (all rows), of each shared golden set of the tenant's domain
    vertical, and of each of its sample sets (a random ``EVALUATION_SAMPLE_ROWS`` rows) —
    of the task the model's kind answers (an embedding model: retrieval sets, measured on
    every pair)."""
    task = dataset_task(model_kind)
    chosen: list[tuple[DatasetVersion, int | None]] = []
    latest = (
        DatasetVersion.objects.filter(
            dataset__tenant=tenant,
            dataset__kind__in=[DatasetKind.GOLDEN, DatasetKind.SAMPLE],
            dataset__task=task,
        )
        .values("dataset_id")
        .annotate(n=Max("number"))
    )
    for row in latest:
        version = DatasetVersion.objects.select_related("dataset").get(
            dataset_id=row["dataset_id"], number=row["n"]
        )
        sample = (
            settings.EVALUATION_SAMPLE_ROWS
            if version.dataset.kind == DatasetKind.SAMPLE and task != Task.RETRIEVAL
            else None
        )
        chosen.append((version, sample))
    if tenant.domain:
        shared = (
            DatasetVersion.objects.filter(
                dataset__tenant__isnull=True,
                dataset__domain=tenant.domain,
                dataset__kind=DatasetKind.GOLDEN,
                dataset__task=task,
            )
            .values("dataset_id")
            .annotate(n=Max("number"))
        )
        for row in shared:
            version = DatasetVersion.objects.select_related("dataset").get(
                dataset_id=row["dataset_id"], number=row["n"]
            )
            chosen.append((version, None))
    return sorted(chosen, key=lambda item: item[0].dataset.name)


@transaction.atomic
def evaluation_request(
    *,
    actor: Any,
    tenant: Tenant,
    model_version: ModelVersion,
    dataset_versions: list[DatasetVersion] | None = None,
    via: str = "",
) -> list[Evaluation]:
    """Queue one evaluation per dataset version (default: every golden and sample set of
    the task the model's kind answers)."""
    kind = model_version.registered_model.kind
    task = dataset_task(kind)
    if dataset_versions:
        targets: list[tuple[DatasetVersion, int | None]] = [(v, None) for v in dataset_versions]
        unfit = [v for v in dataset_versions if v.dataset.task != task]
        if unfit:
            raise InvalidInput(
                f"{article(kind)} {kind} model is evaluated on {task} datasets; {unfit[0].pk} is "
                f"{unfit[0].dataset.task}",
                fields={
                    "dataset_versions": [
                        f"{unfit[0].pk} is a {unfit[0].dataset.task} dataset version; "
                        f"{article(kind)} {kind} model is evaluated on {task} data."
                    ]
                },
            )
    else:
        targets = default_evaluation_versions(tenant=tenant, model_kind=kind)
    if not targets:
        what = WHAT_TO_EVALUATE_ON.get(task, "golden or sample")
        raise InvalidInput(
            f"this tenant has no {what} dataset to evaluate on; upload one first",
            fields={"dataset_versions": [f"No {what} dataset version to evaluate on."]},
        )
    created = []
    for version, max_rows in targets:
        evaluation = Evaluation.objects.create(
            tenant=tenant,
            model_version=model_version,
            dataset_version=version,
            artifact_sha256=model_version.sha256,
            max_rows=max_rows,
            requested_by=actor if getattr(actor, "is_authenticated", False) else None,
            queued_at=timezone.now(),
        )
        audit_record(
            actor=actor,
            tenant=tenant,
            verb="evaluation.request",
            obj=evaluation,
            after={"model_version": model_version.pk, "dataset_version": version.pk},
            via=via,
        )
        transaction.on_commit(functools.partial(_send, evaluation.pk))
        created.append(evaluation)
    return created


def _send(evaluation_id: str) -> None:
    from apps.evaluation.tasks import run_evaluation

    run_evaluation.apply_async((evaluation_id,), queue=settings.TRAINING_QUEUE)


def evaluation_claim(*, evaluation_id: str, worker: str) -> Evaluation | None:
    """Take a queued evaluation for this worker (the next attempt); None if another worker
    has it or it has finished, so a redelivered task does nothing."""
    with transaction.atomic():
        evaluation = (
            Evaluation.objects.select_for_update()
            .filter(pk=evaluation_id, status=EvalStatus.QUEUED)
            .first()
        )
        if evaluation is None:
            return None
        evaluation.status = EvalStatus.RUNNING
        evaluation.attempt += 1
        evaluation.claimed_by = worker
        evaluation.heartbeat_at = timezone.now()
        evaluation.started_at = evaluation.heartbeat_at  # this attempt's start
        evaluation.save(
            update_fields=["status", "attempt", "claimed_by", "heartbeat_at", "started_at"]
        )
    return Evaluation.objects.select_related(
        "model_version__run",
        "model_version__registered_model",
        "dataset_version__dataset",
        "tenant",
    ).get(pk=evaluation_id)


def _fenced(evaluation_id: str, attempt: int) -> Any:
    return Evaluation.objects.filter(pk=evaluation_id, attempt=attempt, status=EvalStatus.RUNNING)


def evaluation_heartbeat(*, evaluation_id: str, attempt: int) -> bool:
    """Renew the attempt's lease; False once the evaluation is no longer this attempt's."""
    return bool(_fenced(evaluation_id, attempt).update(heartbeat_at=timezone.now()))


def stale_running() -> Q:
    """Running evaluations whose worker stopped renewing its lease: never reused by a
    promotion, re-queued by the reaper."""
    cutoff = timezone.now() - timedelta(seconds=settings.EVALUATION_HEARTBEAT_TIMEOUT_SECONDS)
    return Q(status=EvalStatus.RUNNING) & (
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)
    )


@transaction.atomic
def evaluation_finish(
    *,
    evaluation_id: str,
    attempt: int,
    metrics: dict[str, Any] | None = None,
    samples: list[dict[str, Any]] | None = None,
    base_metrics: dict[str, Any] | None = None,
    wrong_queries: list[dict[str, Any]] | None = None,
    error: str = "",
) -> Evaluation | None:
    """Record the attempt's result; None (nothing written) if it was superseded."""
    evaluation = _fenced(evaluation_id, attempt).select_for_update().first()
    if evaluation is None:
        return None
    evaluation.status = EvalStatus.FAILED if error else EvalStatus.SUCCEEDED
    evaluation.metrics = metrics or {}
    evaluation.samples = samples or []
    evaluation.base_metrics = base_metrics or {}
    evaluation.wrong_queries = wrong_queries or []
    evaluation.error = error[-4000:]
    evaluation.finished_at = timezone.now()
    evaluation.save()
    # Requests waiting on this evaluation move on once it is recorded.
    transaction.on_commit(_enqueue_promotion_checks)
    audit_record(
        actor=None,
        tenant=evaluation.tenant,
        verb=f"evaluation.{evaluation.status}",
        obj=evaluation,
        after={
            "status": evaluation.status,
            **{
                key: (metrics or {}).get(key)
                for key in HEADLINE.get(str((metrics or {}).get("task")), ("accuracy", "macro_f1"))
            },
        },
        via="task",
    )
    return evaluation


def evaluations_requeue_stale() -> list[str]:
    """Give both waits of an evaluation a way out; returns the ids sent again.

    A running evaluation whose heartbeat went stale (or whose holder is a dead process of
    this host: ``apps.core.leases.holder_gone``) lost its worker: it is re-queued, its
    next claim a new attempt (the old worker, should it wake, writes nothing), or failed once
    ``EVALUATION_MAX_ATTEMPTS`` attempts were lost so, and its promotion moves on either way.
    The broker hands an unacked task back only after its visibility timeout (an hour on
    Redis), so the database notices within the lease. A queued evaluation no worker claimed
    within ``TRAINING_DISPATCH_TIMEOUT_SECONDS`` while the queue is empty lost its message
    (a broker restart) and is sent again.
    """
    from apps.core.leases import gone_holders

    gone = gone_holders(Evaluation.objects.filter(status=EvalStatus.RUNNING))
    stale = Evaluation.objects.filter(stale_running()).values_list("pk", flat=True)
    sent = [pk for pk in dict.fromkeys([*stale, *gone]) if _requeue(pk)]
    cutoff = timezone.now() - timedelta(seconds=settings.TRAINING_DISPATCH_TIMEOUT_SECONDS)
    unclaimed = Evaluation.objects.filter(status=EvalStatus.QUEUED).filter(
        Q(queued_at__lt=cutoff) | Q(queued_at__isnull=True, created_at__lt=cutoff)
    )
    lost = list(unclaimed.exclude(pk__in=sent).values_list("pk", flat=True))
    if lost and queue_depth(settings.TRAINING_QUEUE) == 0:
        sent += [pk for pk in lost if _resend(unclaimed, pk)]
    return sent


@transaction.atomic
def _requeue(evaluation_id: str) -> bool:
    from apps.core.leases import lost_reason

    evaluation = (
        Evaluation.objects.select_for_update()
        .filter(status=EvalStatus.RUNNING, pk=evaluation_id)
        .first()
    )
    if evaluation is None:
        return False
    reason = lost_reason(
        evaluation.claimed_by,
        stale=Evaluation.objects.filter(stale_running(), pk=evaluation_id).exists(),
    )
    if reason is None:
        return False
    before = {
        "status": evaluation.status,
        "attempt": evaluation.attempt,
        "worker": evaluation.claimed_by,
    }
    if evaluation.attempt >= settings.EVALUATION_MAX_ATTEMPTS:
        evaluation.status = EvalStatus.FAILED
        evaluation.error = (
            f"The worker evaluating it was lost {evaluation.attempt} times (the last: "
            f"{evaluation.claimed_by or 'unknown'}), so it is not retried again. A model that "
            "kills its worker (out of memory?) fails this way: see that worker's log."
        )
        evaluation.finished_at = timezone.now()
        evaluation.save(update_fields=["status", "error", "finished_at"])
        after = {
            "status": evaluation.status,
            "reason": "worker lost",
            "attempts": evaluation.attempt,
        }
        audit_record(
            actor=None,
            tenant=evaluation.tenant,
            verb="evaluation.failed",
            obj=evaluation,
            before=before,
            after=after,
            via="task",
        )
        transaction.on_commit(_enqueue_promotion_checks)
        return False
    evaluation.status = EvalStatus.QUEUED
    evaluation.claimed_by = ""
    evaluation.queued_at = timezone.now()
    evaluation.save(update_fields=["status", "claimed_by", "queued_at"])
    after = {
        "status": evaluation.status,
        "attempt": evaluation.attempt,
        "reason": reason,
    }
    audit_record(
        actor=None,
        tenant=evaluation.tenant,
        verb="evaluation.requeue",
        obj=evaluation,
        before=before,
        after=after,
        via="task",
    )
    transaction.on_commit(functools.partial(_send, evaluation.pk))
    return True


@transaction.atomic
def _resend(unclaimed: Any, evaluation_id: str) -> bool:
    evaluation = unclaimed.select_for_update().filter(pk=evaluation_id).first()
    if evaluation is None:
        return False
    evaluation.queued_at = timezone.now()
    evaluation.save(update_fields=["queued_at"])
    audit_record(
        actor=None,
        tenant=evaluation.tenant,
        verb="evaluation.resend",
        obj=evaluation,
        after={"status": evaluation.status, "reason": "not claimed"},
        via="task",
    )
    transaction.on_commit(functools.partial(_send, evaluation.pk))
    return True


def _enqueue_promotion_checks() -> None:
    from apps.promotions.tasks import check_waiting_promotions

    check_waiting_promotions.delay()


def default_gates(model_kind: str) -> list[dict[str, Any]]:
    gates = DEFAULT_GATES_BY_KIND.get(model_kind, DEFAULT_GATES)
    return [dict(g) for g in gates]


def _default_policy_fields(model_kind: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"gates": default_gates(model_kind)}
    if model_kind == ModelKind.EMBEDDING:
        fields["max_regression_vs_champion"] = DEFAULT_EMBEDDING_MAX_REGRESSION
    if model_kind == ModelKind.AUTOCOMPLETE:
        fields["max_regression_vs_champion"] = DEFAULT_AUTOCOMPLETE_MAX_REGRESSION
    return fields


def gate_metrics(model_kind: str) -> tuple[str, ...]:
    """The metrics an evaluation of a model of ``model_kind`` measures: what its policy's
    gates may name (a gate on anything else would fail every version)."""
    if model_kind == ModelKind.EMBEDDING:
        return (*RETRIEVAL_METRICS, "latency_ms_p50", "latency_ms_p95")
    if model_kind == ModelKind.AUTOCOMPLETE:
        return (*AUTOCOMPLETE_METRICS, *AUTOCOMPLETE_LATENCY)
    other = (*RETRIEVAL_METRICS, *AUTOCOMPLETE_METRICS, *AUTOCOMPLETE_LATENCY)
    return tuple(m for m in GATE_METRICS if m not in other)


def regression_metrics(model_kind: str) -> tuple[str, ...]:
    """What ``max_regression_vs_champion`` compares for a kind."""
    return REGRESSION_METRICS.get(model_kind, DEFAULT_REGRESSION_METRICS)


def latency_budget_metric(model_kind: str) -> str:
    """What ``latency_budget_ms`` bounds for a kind (p95 per batch; per token for
    autocomplete)."""
    return LATENCY_BUDGET_METRIC.get(model_kind, "latency_ms_p95")


def policy_for(*, tenant: Tenant, model_kind: str) -> PromotionPolicy:
    """The tenant's policy for a kind; the sensible default (unsaved) when none was set."""
    found = PromotionPolicy.objects.filter(tenant=tenant, model_kind=model_kind).first()
    return found or PromotionPolicy(
        tenant=tenant, model_kind=model_kind, **_default_policy_fields(model_kind)
    )


@transaction.atomic
def policy_update(
    *,
    actor: Any,
    tenant: Tenant,
    model_kind: str,
    gates: list[dict[str, Any]],
    max_regression_vs_champion: float | None,
    latency_budget_ms: float | None,
    require_staging_before_production: bool,
    trainer_may_approve: bool = False,
    via: str = "",
) -> PromotionPolicy:
    policy, _ = PromotionPolicy.objects.select_for_update().get_or_create(
        tenant=tenant, model_kind=model_kind, defaults=_default_policy_fields(model_kind)
    )
    before = {
        "gates": policy.gates,
        "max_regression_vs_champion": policy.max_regression_vs_champion,
        "latency_budget_ms": policy.latency_budget_ms,
        "require_staging_before_production": policy.require_staging_before_production,
        "trainer_may_approve": policy.trainer_may_approve,
    }
    policy.gates = gates
    policy.max_regression_vs_champion = max_regression_vs_champion
    policy.latency_budget_ms = latency_budget_ms
    policy.require_staging_before_production = require_staging_before_production
    policy.trainer_may_approve = trainer_may_approve
    policy.updated_by = actor
    policy.save()
    after = {
        "gates": gates,
        "max_regression_vs_champion": max_regression_vs_champion,
        "latency_budget_ms": latency_budget_ms,
        "require_staging_before_production": require_staging_before_production,
        "trainer_may_approve": trainer_may_approve,
    }
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="policy.update",
        obj=policy,
        object_id=model_kind,
        before=before,
        after=after,
        via=via,
    )
    return policy
