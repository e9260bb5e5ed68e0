"""Writes for training runs and sweeps.

A run's life: ``run_launch`` (queued) -> ``runs_dispatch`` hands it to the broker when its
tenant is under its concurrency limit and the shared budget has room, by fair share -> a
worker's ``run_claim`` (running; ``attempt`` +1) -> heartbeats, metrics and checkpoints,
each fenced by the attempt -> ``run_succeed`` / ``run_fail`` / ``run_mark_cancelled``. Two
reapers give every waiting state a way out: ``runs_requeue_stale`` puts a run whose worker
vanished back in the queue (the next claim resumes from its last checkpoint), and
``runs_redispatch_lost`` sends a run again whose dispatch no worker ever took (its message
lost), failing it after a few tries.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import DomainError, InvalidInput
from apps.core.leases import queue_depth
from apps.datasets.models import DatasetKind, DatasetVersion, Task
from apps.tenants.models import Tenant
from apps.training import fairshare
from apps.training.models import FINISHED, RunMetric, RunStatus, Sweep, TrainingRun

log = logging.getLogger(__name__)
LOG_TAIL_LINES = 200


def _state(run: TrainingRun) -> dict[str, Any]:
    return {"status": run.status, "attempt": run.attempt}


def _enqueue_dispatch() -> None:
    from apps.training.tasks import dispatch_runs

    dispatch_runs.delay()


def _dispatch_now() -> None:
    """After a run ends (on the worker that ran it): hand the next runs to the broker at
    once, a broker round trip sooner than ``training.dispatch`` would; that task is the
    fallback when this fails."""
    try:
        runs_dispatch()
    except Exception:
        log.warning("dispatch after a run ended failed; sending training.dispatch", exc_info=True)
        _enqueue_dispatch()


def check_training_data(
    *,
    tenant: Tenant,
    dataset_version: DatasetVersion,
    validation_version: DatasetVersion | None,
    base_model: str | None = None,
) -> None:
    """Refuse data a run cannot train on, naming each field (400): a retrieval dataset
    trains an embedding base model, a reply corpus an autocomplete base model and a
    classification dataset a classifier."""
    fields: dict[str, list[str]] = {}
    if dataset_version.dataset.tenant_id != tenant.pk:
        fields["dataset_version"] = ["No such dataset version."]
    elif dataset_version.dataset.kind != DatasetKind.TRAINING:
        fields["dataset_version"] = [
            f"'{dataset_version.dataset.name}' is a {dataset_version.dataset.kind} dataset; "
            "train on a training dataset (golden sets are for evaluation only)."
        ]
    elif base_model is not None and (mismatch := _task_mismatch(dataset_version, base_model)):
        fields["base_model"] = [mismatch]
        fields["dataset_version"] = [mismatch]
    elif dataset_version.dataset.task == Task.RETRIEVAL:
        pass  # a document answers any number of queries, one is enough
    elif dataset_version.dataset.task == Task.TEXT_GENERATION:
        # Replies have no labels; validation holds out whole distinct replies, so two at least.
        if dataset_version.rows < 2:
            fields["dataset_version"] = [
                f"An autocomplete run needs at least 2 replies; this version has "
                f"{dataset_version.rows}."
            ]
    else:
        minimum = settings.TRAINING_MIN_ROWS_PER_LABEL
        thin = sorted(label for label, n in dataset_version.labels.items() if n < minimum)
        if thin:
            shown = ", ".join(repr(x) for x in thin[:5]) + (" ..." if len(thin) > 5 else "")
            fields["dataset_version"] = [
                f"{len(thin)} label(s) have fewer than {minimum} rows: {shown}"
            ]
    if validation_version is not None and validation_version.dataset.tenant_id != tenant.pk:
        fields["validation_version"] = ["No such dataset version."]
    elif validation_version is not None and validation_version.dataset.kind != (
        DatasetKind.TRAINING
    ):
        # A run tuned (early stopping, best checkpoint) on the gates' own yardstick would
        # pass them by construction.
        fields["validation_version"] = [
            f"'{validation_version.dataset.name}' is a {validation_version.dataset.kind} "
            "dataset; validate on a training dataset (golden and sample sets are for "
            "evaluation only)."
        ]
    elif validation_version is not None and (
        validation_version.dataset.task != dataset_version.dataset.task
    ):
        fields["validation_version"] = [
            f"'{validation_version.dataset.name}' is a {validation_version.dataset.task} "
            f"dataset; validate a {dataset_version.dataset.task} run on "
            f"{dataset_version.dataset.task} data."
        ]
    if fields:
        raise InvalidInput(next(iter(fields.values()))[0], fields=fields)


def _task_mismatch(dataset_version: DatasetVersion, base_model: str) -> str | None:
    """Why ``base_model`` cannot train on this data's task, or None when it can."""
    from worker import base_models

    try:
        kind = base_models.get(base_model).kind
    except base_models.UnknownBaseModel:
        return None  # the params check names it
    task = dataset_version.dataset.task
    wants = base_kind_for_task(task)
    if kind == wants:
        return None
    fitting = ", ".join(m.id for m in base_models.catalogue() if m.kind == wants)
    return (
        f"'{dataset_version.dataset.name}' is a {task} dataset and '{base_model}' "
        f"{_a(kind)} base model; train it with {_a(wants)} base model ({fitting})."
    )


def base_kind_for_task(task: str) -> str:
    """The kind of base model a dataset of ``task`` trains: retrieval pairs an embedding
    model, a reply corpus an autocomplete model, labelled texts a classifier."""
    from worker import base_models

    if task == Task.RETRIEVAL:
        return base_models.KIND_EMBEDDING
    if task == Task.TEXT_GENERATION:
        return base_models.KIND_AUTOCOMPLETE
    return base_models.KIND_CLASSIFIER


def _a(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


def check_model_kind(*, tenant: Tenant, model_name: str, base_model: str) -> None:
    """A registered model holds versions of one kind: a run whose base model is of another
    kind than the model it would register into is refused (400 on model_name)."""
    from apps.registry.models import RegisteredModel
    from worker import base_models

    existing = RegisteredModel.objects.filter(tenant=tenant, name=model_name).first()
    try:
        kind = base_models.get(base_model).kind
    except base_models.UnknownBaseModel:
        return
    if existing is not None and existing.kind != kind:
        message = (
            f"The model '{model_name}' holds {existing.kind} versions; '{base_model}' trains "
            f"{_a(kind)} model. Name another model."
        )
        raise InvalidInput(message, fields={"model_name": [message]})


@transaction.atomic
def run_launch(
    *,
    actor: Any,
    tenant: Tenant,
    dataset_version: DatasetVersion,
    base_model: str,
    params: dict[str, Any],
    validation_version: DatasetVersion | None = None,
    model_name: str = "",
    sweep: Sweep | None = None,
    rerun_of: TrainingRun | None = None,
    via: str = "",
) -> TrainingRun:
    check_training_data(
        tenant=tenant,
        dataset_version=dataset_version,
        validation_version=validation_version,
        base_model=base_model,
    )
    check_model_kind(
        tenant=tenant, model_name=model_name or dataset_version.dataset.name, base_model=base_model
    )
    run = TrainingRun.objects.create(
        tenant=tenant,
        dataset_version=dataset_version,
        validation_version=validation_version,
        model_name=model_name or dataset_version.dataset.name,
        base_model=base_model,
        params=params,
        sweep=sweep,
        rerun_of=rerun_of,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="run.launch",
        obj=run,
        after={"base_model": base_model, "params": params, "dataset_version": dataset_version.pk},
        via=via,
    )
    transaction.on_commit(_enqueue_dispatch)
    return run


def tenant_run_limit(tenant: Tenant) -> int:
    return int(tenant.max_concurrent_runs or settings.TRAINING_MAX_CONCURRENT_RUNS_PER_TENANT)


def _send_run(run_id: str) -> None:
    from apps.training.tasks import execute_run

    execute_run.apply_async((run_id,), queue=settings.TRAINING_QUEUE)


def runs_dispatch() -> list[str]:
    """Hand queued runs to the broker up to the training budget every tenant shares
    (TRAINING_MAX_CONCURRENT_RUNS), by weighted fair share (``fairshare.pick``), each tenant
    within its own limit. A batch prediction is a GPU job of its tenant like a one-off run:
    it waits in the same queue and counts against the same limits (the ids sent include
    it).

    A run counts from dispatch until it finishes, so one tenant's sweep of 50 points or a
    campaign over 200 tenants occupies its share of the GPUs while other tenants' runs
    still go. One dispatcher at a time decides (a transaction-scoped lock); a run is
    claimed for the broker by a conditional update, so nothing is sent twice.
    """
    from apps.batch import services as batch_services
    from apps.campaigns.models import Campaign

    sent: list[str] = []
    with transaction.atomic():
        _dispatch_lock()
        waiting_rows: list[tuple[str, str, str | None, Any]] = list(
            TrainingRun.objects.filter(
                status=RunStatus.QUEUED, dispatched_at__isnull=True
            ).values_list("pk", "tenant_id", "campaign_item__campaign_id", "created_at")
        )
        batch_waiting = batch_services.gpu_waiting()
        if not waiting_rows and not batch_waiting:
            return sent
        waiting_rows += [(pk, tenant_id, None, created) for pk, tenant_id, created in batch_waiting]
        busy_rows: list[tuple[str, str | None]] = list(
            TrainingRun.objects.filter(
                Q(status=RunStatus.RUNNING)
                | Q(status=RunStatus.QUEUED, dispatched_at__isnull=False)
            ).values_list("tenant_id", "campaign_item__campaign_id")
        )
        busy_rows += [(tenant_id, None) for tenant_id in batch_services.gpu_busy()]
        batch_ids = {pk for pk, _, _ in batch_waiting}
        waiting = [
            fairshare.Waiting(
                run_id=pk,
                tenant_id=tenant_id,
                queue=fairshare.queue_of(tenant_id=tenant_id, campaign_id=campaign_id),
                created_at=created_at,
            )
            for pk, tenant_id, campaign_id, created_at in waiting_rows
        ]
        busy = [
            fairshare.Busy(
                tenant_id=tenant_id,
                queue=fairshare.queue_of(tenant_id=tenant_id, campaign_id=campaign_id),
            )
            for tenant_id, campaign_id in busy_rows
        ]
        tenant_ids = {w.tenant_id for w in waiting}
        limits = {t.pk: tenant_run_limit(t) for t in Tenant.objects.filter(pk__in=tenant_ids)}
        campaign_ids = {c for *_, c, _ in waiting_rows if c} | {c for _, c in busy_rows if c}
        weights = {
            fairshare.queue_of(tenant_id="", campaign_id=pk): float(weight)
            for pk, weight in Campaign.objects.filter(pk__in=campaign_ids).values_list(
                "pk", "weight"
            )
        }
        chosen = fairshare.pick(
            waiting,
            busy,
            budget=settings.TRAINING_MAX_CONCURRENT_RUNS,
            tenant_limit=limits,
            weights=weights,
        )
        now = timezone.now()
        for run_id in chosen:
            if run_id in batch_ids:
                if batch_services.gpu_send(run_id, now):
                    sent.append(run_id)
                continue
            claimed = TrainingRun.objects.filter(
                pk=run_id, status=RunStatus.QUEUED, dispatched_at__isnull=True
            ).update(dispatched_at=now)
            if claimed:
                sent.append(run_id)
                transaction.on_commit(functools.partial(_send_run, run_id))
    return sent


def _dispatch_lock() -> None:
    """One dispatcher decides at a time: a PostgreSQL advisory lock held to the end of the
    transaction (SQLite lets one writer in at a time anyway)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [DISPATCH_LOCK_KEY])


# A fixed key for the dispatcher's advisory lock ("wbdispatch" folded into a bigint).
DISPATCH_LOCK_KEY = 0x7762_6469_7370


def run_claim(*, run_id: str, worker: str) -> TrainingRun | None:
    """Take a dispatched run for this worker; None if another worker has it or it ended."""
    now = timezone.now()
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None or run.status != RunStatus.QUEUED:
            return None
        if run.cancel_requested:
            run.status = RunStatus.CANCELLED
            run.stop_reason = "cancelled"
            run.finished_at = now
            run.save(update_fields=["status", "stop_reason", "finished_at"])
            transaction.on_commit(_enqueue_dispatch)
            return None
        before = _state(run)
        run.status = RunStatus.RUNNING
        run.attempt += 1
        run.claimed_by = worker
        run.heartbeat_at = now
        run.started_at = run.started_at or now
        run.dispatched_at = run.dispatched_at or now
        run.redispatches = 0
        run.save(
            update_fields=[
                "status",
                "attempt",
                "claimed_by",
                "heartbeat_at",
                "started_at",
                "dispatched_at",
                "redispatches",
            ]
        )
        audit_record(
            actor=None,
            tenant=run.tenant,
            verb="run.start" if run.attempt == 1 else "run.resume",
            obj=run,
            before=before,
            after={**_state(run), "worker": worker, "checkpoint_step": run.checkpoint_step},
            via="task",
        )
    return run


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learnt: whether this worker still holds the run, and cancel."""

    held: bool
    cancel: bool


def _fenced(run_id: str, attempt: int) -> Any:
    return TrainingRun.objects.filter(pk=run_id, attempt=attempt, status=RunStatus.RUNNING)


def run_heartbeat(
    *,
    run_id: str,
    attempt: int,
    progress: dict[str, Any] | None = None,
    log_lines: Iterable[str] = (),
) -> Beat:
    changes: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if progress is not None:
        changes["progress"] = progress
    lines = list(log_lines)
    with transaction.atomic():
        if lines:
            current = _fenced(run_id, attempt).values_list("log_tail", flat=True).first()
            if current is not None:
                changes["log_tail"] = (list(current) + lines)[-LOG_TAIL_LINES:]
        updated = _fenced(run_id, attempt).update(**changes)
    if not updated:
        return Beat(held=False, cancel=False)
    cancel = TrainingRun.objects.filter(pk=run_id).values_list("cancel_requested", flat=True)
    return Beat(held=True, cancel=bool(cancel.first()))


def run_lease_check(*, run_id: str, attempt: int) -> bool:
    """Whether ``attempt`` still holds the run, renewing its heartbeat if so.

    Asked right before each write that leaves the database (an upload, an MLflow call), so
    a superseded attempt stops there; one conditional UPDATE, so it cannot be answered for
    an attempt the reaper is re-queuing at the same moment.
    """
    return bool(_fenced(run_id, attempt).update(heartbeat_at=timezone.now()))


def run_record_metrics(*, run_id: str, points: Iterable[dict[str, Any]]) -> None:
    RunMetric.objects.bulk_create(
        [
            RunMetric(
                run_id=run_id,
                name=p["name"],
                step=p["step"],
                epoch=p.get("epoch"),
                value=p["value"],
            )
            for p in points
        ],
        ignore_conflicts=True,
    )


def run_record_checkpoint(*, run_id: str, attempt: int, key: str, step: int) -> bool:
    return bool(
        _fenced(run_id, attempt).update(
            checkpoint_key=key, checkpoint_step=step, heartbeat_at=timezone.now()
        )
    )


def run_set_tracking(
    *, run_id: str, attempt: int, mlflow_run_id: str, environment: dict[str, Any]
) -> bool:
    return bool(
        _fenced(run_id, attempt).update(mlflow_run_id=mlflow_run_id, environment=environment)
    )


def _finish(run: TrainingRun, status: RunStatus, **fields: Any) -> None:
    before = _state(run)
    run.status = status
    run.finished_at = timezone.now()
    for name, value in fields.items():
        setattr(run, name, value)
    run.save()
    audit_record(
        actor=None,
        tenant=run.tenant,
        verb=f"run.{status.value}",
        obj=run,
        before=before,
        after={"status": status.value, **{k: v for k, v in fields.items() if k != "progress"}},
        via="task",
    )
    transaction.on_commit(_dispatch_now)
    transaction.on_commit(functools.partial(_nudge_campaign, run.pk))


def _nudge_campaign(run_id: str) -> None:
    from apps.campaigns.services import nudge_for_run

    nudge_for_run(run_id)


def _lock_fenced(run_id: str, attempt: int) -> TrainingRun | None:
    return (
        TrainingRun.objects.select_for_update()
        .filter(pk=run_id, attempt=attempt, status=RunStatus.RUNNING)
        .first()
    )


@transaction.atomic
def run_succeed(
    *,
    run_id: str,
    attempt: int,
    metrics: dict[str, Any],
    stop_reason: str,
    stop_detail: str,
    progress: dict[str, Any],
    version_fields: dict[str, Any],
    samples: list[dict[str, Any]] | None = None,
) -> TrainingRun | None:
    """Finish a run and register its model version, both or neither (one transaction)."""
    from apps.registry.services import model_version_create

    run = _lock_fenced(run_id, attempt)
    if run is None:
        return None
    model_version_create(run=run, **version_fields)
    _finish(
        run,
        RunStatus.SUCCEEDED,
        metrics=metrics,
        stop_reason=stop_reason,
        stop_detail=stop_detail,
        progress=progress,
        samples=samples or [],
    )
    return run


@transaction.atomic
def run_fail(*, run_id: str, attempt: int, error: str) -> TrainingRun | None:
    run = _lock_fenced(run_id, attempt)
    if run is None:
        return None
    _finish(run, RunStatus.FAILED, error=error[-4000:], stop_reason="error")
    return run


@transaction.atomic
def run_mark_cancelled(
    *, run_id: str, attempt: int, progress: dict[str, Any]
) -> TrainingRun | None:
    run = _lock_fenced(run_id, attempt)
    if run is None:
        return None
    _finish(
        run,
        RunStatus.CANCELLED,
        stop_reason="cancelled",
        stop_detail="cancelled by a user",
        progress=progress,
    )
    return run


@transaction.atomic
def run_cancel(*, actor: Any, run: TrainingRun, via: str = "") -> TrainingRun:
    """Cancel a queued run at once; ask a running one to stop (it does within seconds)."""
    locked = TrainingRun.objects.select_for_update().get(pk=run.pk)
    if locked.status in FINISHED:
        raise DomainError(
            f"The run is already {locked.status}; only queued or running runs can be cancelled.",
            code="illegal_transition",
            status=locked.status,
        )
    before = _state(locked)
    locked.cancel_requested = True
    fields = ["cancel_requested"]
    if locked.status == RunStatus.QUEUED:
        locked.status = RunStatus.CANCELLED
        locked.stop_reason = "cancelled"
        locked.stop_detail = "cancelled by a user before it started"
        locked.finished_at = timezone.now()
        fields += ["status", "stop_reason", "stop_detail", "finished_at"]
        transaction.on_commit(_enqueue_dispatch)
        transaction.on_commit(functools.partial(_nudge_campaign, locked.pk))
    locked.save(update_fields=fields)
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="run.cancel",
        obj=locked,
        before=before,
        after={**_state(locked), "cancel_requested": True},
        via=via,
    )
    return locked


def runs_requeue_stale(*, timeout: timedelta | None = None) -> list[str]:
    """Put running runs whose heartbeat went stale, or whose holder is a dead process of
    this host (``apps.core.leases.holder_gone``: no need to wait out its lease), back in
    the queue (worker lost); the next attempt resumes from the checkpoint.

    Redis hands an unacked task back only after its visibility timeout (an hour by
    default), so the database, not the broker, notices a dead worker within seconds.
    """
    from apps.core.leases import gone_holders, lost_reason

    if timeout is None:
        timeout = timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_SECONDS)
    cutoff = timezone.now() - timeout
    requeued: list[str] = []
    running = TrainingRun.objects.filter(status=RunStatus.RUNNING)
    stale = list(running.filter(heartbeat_at__lt=cutoff).values_list("pk", flat=True))
    for run_id in dict.fromkeys([*stale, *gone_holders(running)]):
        with transaction.atomic():
            run = running.select_for_update().filter(pk=run_id).first()
            if run is None:
                continue
            lease_ran_out = run.heartbeat_at is not None and run.heartbeat_at < cutoff
            reason = lost_reason(run.claimed_by, stale=lease_ran_out)
            if reason is None:
                continue
            before = {**_state(run), "worker": run.claimed_by}
            run.status = RunStatus.QUEUED
            run.dispatched_at = None
            run.claimed_by = ""
            run.save(update_fields=["status", "dispatched_at", "claimed_by"])
            audit_record(
                actor=None,
                tenant=run.tenant,
                verb="run.requeue",
                obj=run,
                before=before,
                after={
                    **_state(run),
                    "reason": reason,
                    "checkpoint_step": run.checkpoint_step,
                },
                via="task",
            )
            requeued.append(run_id)
    if requeued:
        transaction.on_commit(_enqueue_dispatch)
    return requeued


def runs_redispatch_lost(*, timeout: timedelta | None = None) -> list[str]:
    """Send again each run dispatched more than ``timeout`` ago that no worker claimed;
    fail one already sent again ``TRAINING_MAX_REDISPATCHES`` times. Returns the ids sent.

    A dispatched run holds one of its tenant's slots until it finishes, so a lost message
    (a broker restarted without persistence, a message dropped) would hold it forever.
    Nothing is sent while messages wait in the training queue: a run waiting behind others
    for a free worker is not lost, and a second message would only queue behind the first.
    Sending again is safe: ``run_claim`` lets one worker take the run, and later copies of
    the message find it taken.
    """
    if timeout is None:
        timeout = timedelta(seconds=settings.TRAINING_DISPATCH_TIMEOUT_SECONDS)
    cutoff = timezone.now() - timeout
    unclaimed = TrainingRun.objects.filter(status=RunStatus.QUEUED, dispatched_at__lt=cutoff)
    run_ids = list(unclaimed.values_list("pk", flat=True))
    if not run_ids or queue_depth(settings.TRAINING_QUEUE) != 0:
        return []
    sent: list[str] = []
    for run_id in run_ids:
        with transaction.atomic():
            run = unclaimed.select_for_update().filter(pk=run_id).first()
            if run is None:
                continue
            before = {**_state(run), "redispatches": run.redispatches}
            if run.redispatches >= settings.TRAINING_MAX_REDISPATCHES:
                _finish(
                    run,
                    RunStatus.FAILED,
                    stop_reason="lost",
                    error=(
                        f"No worker took the run from the {settings.TRAINING_QUEUE!r} queue: "
                        f"it was sent {run.redispatches + 1} times and each time no worker "
                        f"claimed it within {int(timeout.total_seconds())} s. Check that a "
                        f"worker consumes the {settings.TRAINING_QUEUE!r} queue of this "
                        "broker, then rerun it."
                    ),
                )
                continue
            run.redispatches += 1
            run.dispatched_at = timezone.now()
            run.save(update_fields=["redispatches", "dispatched_at"])
            audit_record(
                actor=None,
                tenant=run.tenant,
                verb="run.redispatch",
                obj=run,
                before=before,
                after={
                    **_state(run),
                    "redispatches": run.redispatches,
                    "reason": f"not claimed within {int(timeout.total_seconds())} s",
                },
                via="task",
            )
            transaction.on_commit(functools.partial(_send_run, run_id))
            sent.append(run_id)
    return sent


def run_rerun(*, actor: Any, run: TrainingRun, via: str = "") -> TrainingRun:
    return run_launch(
        actor=actor,
        tenant=run.tenant,
        dataset_version=run.dataset_version,
        validation_version=run.validation_version,
        base_model=run.base_model,
        params=dict(run.params),
        model_name=run.model_name,
        rerun_of=run,
        via=via,
    )


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = sorted(grid)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(grid[n] for n in names))
    ]


@transaction.atomic
def sweep_launch(
    *,
    actor: Any,
    tenant: Tenant,
    dataset_version: DatasetVersion,
    base_model: str,
    base_params: dict[str, Any],
    grid: dict[str, list[Any]],
    metric: str,
    goal: str,
    model_name: str = "",
    validation_version: DatasetVersion | None = None,
    via: str = "",
) -> Sweep:
    check_training_data(
        tenant=tenant,
        dataset_version=dataset_version,
        validation_version=validation_version,
        base_model=base_model,
    )
    points = grid_points(grid)
    if len(points) > settings.TRAINING_MAX_SWEEP_POINTS:
        raise InvalidInput(
            f"the grid has {len(points)} points; the limit is {settings.TRAINING_MAX_SWEEP_POINTS}",
            fields={
                "grid": [
                    f"{len(points)} points is over the limit of "
                    f"{settings.TRAINING_MAX_SWEEP_POINTS}"
                ]
            },
        )
    sweep = Sweep.objects.create(
        tenant=tenant,
        dataset_version=dataset_version,
        base_model=base_model,
        grid=grid,
        base_params=base_params,
        metric=metric,
        goal=goal,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="sweep.launch",
        obj=sweep,
        after={"grid": grid, "metric": metric, "goal": goal, "points": len(points)},
        via=via,
    )
    for point in points:
        run_launch(
            actor=actor,
            tenant=tenant,
            dataset_version=dataset_version,
            validation_version=validation_version,
            base_model=base_model,
            params={**base_params, **point},
            model_name=model_name,
            sweep=sweep,
            via=via,
        )
    return sweep
