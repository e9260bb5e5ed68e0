"""Campaigns: one model retrained, evaluated and put up for review in many tenants at once.

``campaign_create`` records the campaign and fires its trigger; ``campaign_advance`` (a
task: after each change a campaign's run or promotion makes, and from beat as a safety net)
fires due triggers — one ``CampaignItem`` per tenant and firing, unique, so a redelivered
task creates nothing twice — and moves every moving item one step under its row lock:

    pending  -> training  (a run on the tenant's latest training version)  | skipped
    training -> checking  (the run succeeded: a promotion request, which evaluates and
                           checks the gates)                               | skipped | cancelled
    checking -> review    (the gates passed: a reviewer decides)           | skipped

What a reviewer then does with a request (approve, reject; the deployment that follows) is
the request's own status, which the campaign reads and never copies. ``campaign_decide``
approves or rejects a campaign's requests in one action, each still four-eyes, bound to
its artifact and audited as one decision of its own.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, CharField, Count, F, QuerySet, When
from django.utils import timezone

from apps.audit.services import audit_record
from apps.campaigns.models import (
    MOVING,
    Campaign,
    CampaignItem,
    CampaignStatus,
    ItemState,
    SkipReason,
    Trigger,
)
from apps.core.errors import DomainError, InvalidInput
from apps.datasets.models import DatasetKind, DatasetVersion
from apps.promotions.gates import champion_delta
from apps.promotions.models import BROKEN, PromotionRequest, PromotionStatus
from apps.tenants.models import Tenant
from apps.training.models import RunStatus, TrainingRun

log = logging.getLogger(__name__)
VIA = "campaign"


# --- selection ---------------------------------------------------------------------------


def selected_tenants(selection: dict[str, Any]) -> QuerySet[Tenant]:
    """The tenants a selection names: ``{"tenants": "all"}``, ``{"tenants": [slugs]}`` or
    ``{"domain": "retail"}``."""
    tenants = Tenant.objects.all()
    if "domain" in selection:
        return tenants.filter(domain=selection["domain"])
    if selection.get("tenants") == "all":
        return tenants
    return tenants.filter(slug__in=list(selection.get("tenants") or []))


def latest_training_version(*, tenant: Tenant, dataset_name: str) -> DatasetVersion | None:
    return (
        DatasetVersion.objects.filter(
            dataset__tenant=tenant, dataset__name=dataset_name, dataset__kind=DatasetKind.TRAINING
        )
        .select_related("dataset")
        .order_by("-number")
        .first()
    )


# --- create, fire, cancel ----------------------------------------------------------------


@transaction.atomic
def campaign_create(
    *,
    actor: Any,
    name: str,
    model_name: str,
    selection: dict[str, Any],
    recipe: dict[str, Any],
    target: str,
    dataset_name: str = "",
    trigger: str = Trigger.NOW,
    interval_seconds: int | None = None,
    weight: int = 1,
    via: str = "",
) -> Campaign:
    """Record a campaign and fire its trigger (a schedule's first round is now; new data
    fires for versions uploaded from now on)."""
    campaign = Campaign.objects.create(
        name=name or model_name,
        model_name=model_name,
        dataset_name=dataset_name or model_name,
        selection=selection,
        recipe=recipe,
        target=target,
        trigger=trigger,
        interval_seconds=interval_seconds,
        weight=weight,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
        next_round_at=timezone.now() if trigger != Trigger.NEW_DATA else None,
    )
    audit_record(
        actor=actor,
        tenant=None,
        verb="campaign.create",
        obj=campaign,
        after={
            "model_name": model_name,
            "dataset_name": campaign.dataset_name,
            "selection": selection,
            "recipe": recipe,
            "target": target,
            "trigger": trigger,
            "interval_seconds": interval_seconds,
            "tenants": selected_tenants(selection).count(),
        },
        via=via,
    )
    _fire(campaign)
    transaction.on_commit(lambda: enqueue_advance(campaign.pk))
    return campaign


def _fire(campaign: Campaign) -> None:
    """Create the items of every trigger firing that is due; the unique (campaign, tenant,
    trigger key) makes a second call create nothing."""
    if campaign.status != CampaignStatus.ACTIVE:
        return
    now = timezone.now()
    tenants = selected_tenants(campaign.selection)
    if campaign.trigger == Trigger.NEW_DATA:
        # Each tenant's newest version uploaded since the campaign began fires once.
        newest: dict[str, str] = {}
        for tenant_id, version_id in (
            DatasetVersion.objects.filter(
                dataset__tenant__in=tenants,
                dataset__name=campaign.dataset_name,
                dataset__kind=DatasetKind.TRAINING,
                created_at__gt=campaign.created_at,
            )
            .order_by("-number")
            .values_list("dataset__tenant_id", "pk")
        ):
            newest.setdefault(tenant_id, version_id)
        wanted = [
            CampaignItem(campaign=campaign, tenant_id=tenant_id, trigger_key=version_id)
            for tenant_id, version_id in newest.items()
        ]
    else:
        if campaign.next_round_at is None or campaign.next_round_at > now:
            return
        if campaign.trigger == Trigger.NOW and campaign.rounds >= 1:
            return
        campaign.rounds += 1
        key = "now" if campaign.trigger == Trigger.NOW else f"round-{campaign.rounds}"
        campaign.next_round_at = (
            now + timedelta(seconds=campaign.interval_seconds or 0)
            if campaign.trigger == Trigger.SCHEDULE
            else None
        )
        Campaign.objects.filter(pk=campaign.pk).update(
            rounds=campaign.rounds, next_round_at=campaign.next_round_at
        )
        wanted = [
            CampaignItem(campaign=campaign, tenant_id=pk, trigger_key=key)
            for pk in tenants.values_list("pk", flat=True)
        ]
    CampaignItem.objects.bulk_create(wanted, ignore_conflicts=True, batch_size=1000)


def campaign_cancel(*, actor: Any, campaign: Campaign, via: str = "") -> Campaign:
    """Stop a campaign: its pending items are cancelled, its queued runs cancelled and its
    running ones asked to stop; requests already up for review stay a reviewer's."""
    from apps.training.services import run_cancel

    with transaction.atomic():
        locked = Campaign.objects.select_for_update().get(pk=campaign.pk)
        if locked.status != CampaignStatus.ACTIVE:
            raise DomainError(
                f"The campaign is {locked.status}; only an active campaign can be cancelled.",
                code="illegal_transition",
                status=locked.status,
            )
        locked.status = CampaignStatus.CANCELLED
        locked.finished_at = timezone.now()
        locked.save(update_fields=["status", "finished_at"])
        stopped = 0
        for item in (
            CampaignItem.objects.select_for_update(of=("self",))
            .filter(campaign=locked, state__in=MOVING)
            .select_related("run")
        ):
            if item.run is not None and item.run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
                try:
                    run_cancel(actor=actor, run=item.run, via=via)
                    stopped += 1
                except DomainError:
                    pass  # it ended meanwhile
            item.state = ItemState.CANCELLED
            item.detail = "the campaign was cancelled"
            item.save(update_fields=["state", "detail", "updated_at"])
        audit_record(
            actor=actor,
            tenant=None,
            verb="campaign.cancel",
            obj=locked,
            before={"status": CampaignStatus.ACTIVE},
            after={"status": CampaignStatus.CANCELLED, "runs_stopped": stopped},
            via=via,
        )
    return locked


# --- advancing ---------------------------------------------------------------------------


def _send(task: Any, object_id: str) -> None:
    try:
        task.delay(object_id)
    except Exception:  # the broker is down: beat's safety net moves it on later
        log.warning("could not enqueue %s", task.name, extra={"object_id": object_id})


def enqueue_advance(campaign_id: str) -> None:
    from apps.campaigns.tasks import advance_campaign

    _send(advance_campaign, campaign_id)


def enqueue_item_advance(item_id: str) -> None:
    from apps.campaigns.tasks import advance_item

    _send(advance_item, item_id)


def nudge_for_run(run_id: str) -> None:
    """After a run's change commits: move its campaign item on, if it has one (only that
    item: a campaign of 10,000 tenants is not swept for each of its runs)."""
    item_id = CampaignItem.objects.filter(run_id=run_id).values_list("pk", flat=True).first()
    if item_id:
        enqueue_item_advance(item_id)


def nudge_for_promotion(promotion_id: str) -> None:
    item_id = (
        CampaignItem.objects.filter(promotion_id=promotion_id).values_list("pk", flat=True).first()
    )
    if item_id:
        enqueue_item_advance(item_id)


def item_advance_and_finish(*, item_id: str) -> int:
    moved = item_advance(item_id=item_id)
    campaign_id = (
        CampaignItem.objects.filter(pk=item_id).values_list("campaign_id", flat=True).first()
    )
    if campaign_id:
        _maybe_finish(campaign_id)
    return moved


def campaign_advance(*, campaign_id: str) -> int:
    """Fire what is due and move every moving item on; returns the items that moved."""
    with transaction.atomic():
        campaign = Campaign.objects.select_for_update().filter(pk=campaign_id).first()
        if campaign is None:
            return 0
        _fire(campaign)
    moved = 0
    item_ids = list(
        CampaignItem.objects.filter(campaign_id=campaign_id, state__in=MOVING)
        .order_by("created_at", "id")
        .values_list("pk", flat=True)
    )
    for item_id in item_ids:
        moved += item_advance(item_id=item_id)
    _maybe_finish(campaign_id)
    return moved


def campaigns_advance_all() -> int:
    moved = 0
    for campaign_id in Campaign.objects.filter(status=CampaignStatus.ACTIVE).values_list(
        "pk", flat=True
    ):
        moved += campaign_advance(campaign_id=campaign_id)
    return moved


def _maybe_finish(campaign_id: str) -> None:
    with transaction.atomic():
        campaign = Campaign.objects.select_for_update().filter(pk=campaign_id).first()
        if campaign is None or campaign.status != CampaignStatus.ACTIVE:
            return
        if campaign.trigger != Trigger.NOW or campaign.rounds < 1:
            return  # a schedule or a data trigger runs until it is cancelled
        if CampaignItem.objects.filter(campaign=campaign, state__in=MOVING).exists():
            return
        campaign.status = CampaignStatus.FINISHED
        campaign.finished_at = timezone.now()
        campaign.save(update_fields=["status", "finished_at"])
        audit_record(
            actor=None,
            tenant=None,
            verb="campaign.finished",
            obj=campaign,
            after={"counts": item_counts(campaign)},
            via="task",
        )


def item_advance(*, item_id: str) -> int:
    """Move one item as far as it can go now; 1 when it moved."""
    moved = 0
    for _ in range(3):  # pending -> training -> checking at most, in one call
        with transaction.atomic():
            item = (
                CampaignItem.objects.select_for_update()
                .select_related("campaign", "tenant")
                .filter(pk=item_id, state__in=MOVING)
                .first()
            )
            if item is None or not _step(item):
                return moved
            moved = 1
    return moved


def _skip(item: CampaignItem, reason: str, detail: str) -> bool:
    item.state = ItemState.SKIPPED
    item.skip_reason = reason
    item.detail = detail[:2000]
    item.save(update_fields=["state", "skip_reason", "detail", "updated_at"])
    return True


def _step(item: CampaignItem) -> bool:
    """One transition of a locked item; False when it has to wait."""
    if item.state == ItemState.PENDING:
        if item.campaign.status != CampaignStatus.ACTIVE:
            item.state = ItemState.CANCELLED
            item.save(update_fields=["state", "updated_at"])
            return True
        return _launch(item)
    if item.state == ItemState.TRAINING:
        return _after_run(item)
    return _after_gates(item)


def _recipe_for(item: CampaignItem) -> tuple[str, dict[str, Any]] | None:
    recipe = item.campaign.recipe
    if not recipe.get("last"):
        return str(recipe["base_model"]), dict(recipe.get("params") or {})
    last = (
        TrainingRun.objects.filter(
            tenant=item.tenant, model_name=item.campaign.model_name, status=RunStatus.SUCCEEDED
        )
        .order_by("-finished_at", "-created_at")
        .first()
    )
    if last is None:
        return None
    return last.base_model, dict(last.params)


def _launch(item: CampaignItem) -> bool:
    from apps.training.services import run_launch

    campaign = item.campaign
    if campaign.trigger == Trigger.NEW_DATA:
        version = DatasetVersion.objects.filter(pk=item.trigger_key).first()
    else:
        version = latest_training_version(tenant=item.tenant, dataset_name=campaign.dataset_name)
    if version is None:
        return _skip(
            item,
            SkipReason.NO_DATA,
            f"The tenant has no training dataset named '{campaign.dataset_name}'.",
        )
    recipe = _recipe_for(item)
    if recipe is None:
        return _skip(
            item,
            SkipReason.NO_PREVIOUS_RUN,
            f"The tenant has no successful run of '{campaign.model_name}' to repeat.",
        )
    base_model, params = recipe
    item.dataset_version = version
    try:
        with transaction.atomic():
            run = run_launch(
                actor=campaign.created_by,
                tenant=item.tenant,
                dataset_version=version,
                base_model=base_model,
                params=params,
                model_name=campaign.model_name,
                via=VIA,
            )
    except InvalidInput as error:
        thin = "fewer than" in error.message or "at least" in error.message
        item.save(update_fields=["dataset_version", "updated_at"])
        return _skip(
            item, SkipReason.TOO_FEW_ROWS if thin else SkipReason.LAUNCH_REFUSED, error.message
        )
    item.run = run
    item.state = ItemState.TRAINING
    item.detail = ""
    item.save(update_fields=["dataset_version", "run", "state", "detail", "updated_at"])
    return True


def _after_run(item: CampaignItem) -> bool:
    from apps.promotions.services import promotion_request

    run = TrainingRun.objects.filter(pk=item.run_id).first()
    if run is None:
        return _skip(item, SkipReason.RUN_FAILED, "The run was deleted.")
    if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
        return False
    if run.status == RunStatus.CANCELLED:
        item.state = ItemState.CANCELLED
        item.detail = run.stop_detail or "the run was cancelled"
        item.save(update_fields=["state", "detail", "updated_at"])
        return True
    if run.status == RunStatus.FAILED:
        return _skip(item, SkipReason.RUN_FAILED, run.error or run.stop_reason or "failed")
    version = getattr(run, "model_version", None)
    if version is None:
        return _skip(item, SkipReason.RUN_FAILED, "The run registered no model version.")
    try:
        with transaction.atomic():
            promotion = promotion_request(
                actor=item.campaign.created_by,
                tenant=item.tenant,
                model_version=version,
                target=item.campaign.target,
                via=VIA,
            )
    except DomainError as error:
        return _skip(item, SkipReason.PROMOTION_FAILED, error.message)
    item.promotion = promotion
    item.state = ItemState.CHECKING
    item.save(update_fields=["promotion", "state", "updated_at"])
    return True


def _after_gates(item: CampaignItem) -> bool:
    promotion = PromotionRequest.objects.filter(pk=item.promotion_id).first()
    if promotion is None:
        return _skip(item, SkipReason.PROMOTION_FAILED, "The promotion request was deleted.")
    if promotion.status == PromotionStatus.CHECKING:
        return False
    if promotion.status == PromotionStatus.GATES_FAILED:
        failing = [r for r in promotion.gate_results if not r.get("passed")]
        detail = "; ".join(
            f"{r.get('metric')} {r.get('value')} {r.get('op')} {r.get('threshold')} "
            f"on {r.get('dataset_name') or 'all'} ({r.get('gate')})"
            for r in failing
        )
        return _skip(item, SkipReason.GATES_FAILED, detail or "a gate failed")
    if promotion.status in BROKEN:
        return _skip(item, SkipReason.PROMOTION_FAILED, promotion.failure or "failed")
    item.state = ItemState.REVIEW
    item.save(update_fields=["state", "updated_at"])
    return True


# --- reading -----------------------------------------------------------------------------

# An item's status as a reader sees it: its own state until it is up for review, then its
# promotion request's (awaiting_approval, approved, deploying, done, rejected, ...).
EFFECTIVE_STATUS = Case(
    When(state=ItemState.REVIEW, then=F("promotion__status")),
    default=F("state"),
    output_field=CharField(),
)


def items_of(campaign: Campaign) -> QuerySet[CampaignItem]:
    return (
        CampaignItem.objects.filter(campaign=campaign)
        .annotate(status=EFFECTIVE_STATUS)
        .select_related("tenant", "run", "promotion", "promotion__model_version")
    )


def item_counts(campaign: Campaign) -> dict[str, int]:
    rows = (
        CampaignItem.objects.filter(campaign=campaign)
        .annotate(status=EFFECTIVE_STATUS)
        .values("status")
        .annotate(n=Count("id"))
    )
    return {row["status"]: row["n"] for row in rows}


def skip_counts(campaign: Campaign) -> dict[str, int]:
    rows = (
        CampaignItem.objects.filter(campaign=campaign, state=ItemState.SKIPPED)
        .values("skip_reason")
        .annotate(n=Count("id"))
    )
    return {row["skip_reason"]: row["n"] for row in rows}


@dataclass
class Progress:
    total: int
    counts: dict[str, int]
    skipped: dict[str, int]
    gpu_seconds: float
    longest_start_delay_s: float | None
    mean_run_s: float | None
    eta_seconds: float | None
    done_fraction: float
    runs: dict[str, int] = field(default_factory=dict)


def campaign_progress(campaign: Campaign) -> Progress:
    """Counts per status and per skip reason, the GPU-seconds its runs used, the longest
    wait of a run for a training slot, and an ETA: the items still to train times the mean
    run time, over the runs training side by side (the budget's share it gets)."""
    counts = item_counts(campaign)
    now = timezone.now()
    runs = list(
        TrainingRun.objects.filter(campaign_item__campaign=campaign).values_list(
            "status", "created_at", "started_at", "finished_at"
        )
    )
    gpu_seconds = sum(
        ((finished or now) - started).total_seconds() for _, _, started, finished in runs if started
    )
    delays = [
        ((started or now) - created).total_seconds()
        for status, created, started, _ in runs
        if started or status == RunStatus.QUEUED
    ]
    durations = [
        (finished - started).total_seconds()
        for status, _, started, finished in runs
        if status == RunStatus.SUCCEEDED and started and finished
    ]
    mean_run = statistics.fmean(durations) if durations else None
    to_train = counts.get(ItemState.PENDING, 0) + counts.get(ItemState.TRAINING, 0)
    running = sum(1 for status, *_ in runs if status == RunStatus.RUNNING)
    side_by_side = max(1, min(running or 1, settings.TRAINING_MAX_CONCURRENT_RUNS))
    eta = None if mean_run is None else to_train * mean_run / side_by_side
    if not to_train and not counts.get(ItemState.CHECKING):
        eta = 0.0
    total = sum(counts.values())
    moving = sum(counts.get(s, 0) for s in MOVING)
    return Progress(
        total=total,
        counts=counts,
        skipped=skip_counts(campaign),
        gpu_seconds=round(gpu_seconds, 1),
        longest_start_delay_s=round(max(delays), 1) if delays else None,
        mean_run_s=None if mean_run is None else round(mean_run, 1),
        eta_seconds=None if eta is None else round(eta, 1),
        done_fraction=round((total - moving) / total, 4) if total else 0.0,
        runs={s: sum(1 for r in runs if r[0] == s) for s in RunStatus.values},
    )


# --- batch review ------------------------------------------------------------------------


@dataclass
class Decision:
    decided: list[dict[str, Any]]
    failed: list[dict[str, Any]]


def awaiting(campaign: Campaign) -> QuerySet[PromotionRequest]:
    return PromotionRequest.objects.filter(
        campaign_item__campaign=campaign, status=PromotionStatus.AWAITING_APPROVAL
    ).select_related("tenant")


def campaign_decide(
    *,
    actor: Any,
    campaign: Campaign,
    promotions: list[str] | str,
    approve: bool,
    comment: str = "",
    via: str = "",
) -> Decision:
    """Approve (or reject) the named requests of this campaign, or every one awaiting a
    decision ("passing": those whose gates passed). Each is decided on its own — four eyes,
    bound to its artifact's sha256, audited — so one refusal stops no other; the refused
    are reported with their reason."""
    from apps.promotions.services import promotion_approve, promotion_reject

    decide = promotion_approve if approve else promotion_reject
    known = {
        p.pk: p
        for p in PromotionRequest.objects.filter(campaign_item__campaign=campaign).select_related(
            "tenant"
        )
    }
    if promotions == "passing":
        wanted = [
            p.pk
            for p in sorted(known.values(), key=lambda p: p.tenant.slug)
            if p.status == PromotionStatus.AWAITING_APPROVAL
        ]
    else:
        wanted = list(dict.fromkeys(promotions))
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise InvalidInput(
            f"Not requests of this campaign: {', '.join(unknown[:10])}.",
            fields={"promotions": [f"{p}: not a request of this campaign." for p in unknown]},
        )
    result = Decision(decided=[], failed=[])
    for promotion_id in wanted:
        promotion = known[promotion_id]
        entry = {"promotion": promotion_id, "tenant": promotion.tenant.slug}
        try:
            decided = decide(actor=actor, promotion=promotion, comment=comment, via=via)
        except DomainError as error:
            result.failed.append({**entry, "code": error.code, "message": error.message})
            continue
        result.decided.append({**entry, "status": decided.status})
    with transaction.atomic():
        audit_record(
            actor=actor,
            tenant=None,
            verb="campaign.approve" if approve else "campaign.reject",
            obj=campaign,
            after={
                "decided": [d["promotion"] for d in result.decided],
                "failed": [{"promotion": f["promotion"], "code": f["code"]} for f in result.failed],
                "comment": comment,
            },
            via=via,
        )
    return result


def regressed(promotion: PromotionRequest) -> bool:
    """Whether any gate against the champion (or the yardstick) measured it worse."""
    return any((d := champion_delta(row)) is not None and d < 0 for row in promotion.gate_results)
