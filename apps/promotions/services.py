"""Promotion requests: evaluations, gates, then a reviewer who is not the requester.

checking -> gates_failed | awaiting_approval | failed; awaiting_approval -> approved |
rejected; approved -> deploying (a deployment is created with the approval) -> done |
failed, as the deployment becomes warm or fails (apps.deployments). Every transition
locks the row, so a double click or two reviewers at once produce exactly one decision;
an illegal one is a 409 naming the current status.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import DomainError
from apps.evaluation import services as evaluation_services
from apps.evaluation.models import EvalStatus, Evaluation
from apps.promotions.gates import check_gates
from apps.promotions.models import OPEN, PromotionRequest, PromotionStatus, Target
from apps.registry.models import ModelVersion, Stage
from apps.tenants.models import ROLE_RANK, Membership, Role, Tenant

log = logging.getLogger(__name__)


def _enqueue_check(promotion_id: str) -> None:
    from apps.promotions.tasks import check_promotion

    check_promotion.delay(promotion_id)


def _reusable_evaluations(version: ModelVersion) -> dict[str, Evaluation]:
    """Finished or live (queued, or running with a fresh heartbeat) evaluations of exactly
    these bytes, by dataset version id. A running one whose worker went silent is not
    reused: the request gets a fresh evaluation rather than wait on the reaper."""
    found: dict[str, Evaluation] = {}
    for evaluation in (
        Evaluation.objects.filter(model_version=version, artifact_sha256=version.sha256)
        .exclude(status=EvalStatus.FAILED)
        .exclude(evaluation_services.stale_running())
        .order_by("created_at")
    ):
        found[evaluation.dataset_version_id] = evaluation
    return found


@transaction.atomic
def promotion_request(
    *, actor: Any, tenant: Tenant, model_version: ModelVersion, target: str, via: str = ""
) -> PromotionRequest:
    ModelVersion.objects.select_for_update().get(pk=model_version.pk)
    open_one = PromotionRequest.objects.filter(
        model_version=model_version, target=target, status__in=OPEN
    ).first()
    if open_one is not None:
        raise DomainError(
            f"This version already has an open {target} request ({open_one.pk}).",
            code="already_requested",
            status=open_one.status,
        )
    policy = evaluation_services.policy_for(
        tenant=tenant, model_kind=model_version.registered_model.kind
    )
    if target == Target.PRODUCTION and policy.require_staging_before_production:
        staged = PromotionRequest.objects.filter(
            model_version=model_version,
            target=Target.STAGING,
            status__in=[PromotionStatus.APPROVED, PromotionStatus.DEPLOYING, PromotionStatus.DONE],
        ).exists()
        if not staged:
            raise DomainError(
                "The policy requires this version to be approved to staging "
                "before it can be requested for production.",
                code="needs_staging",
            )
    promotion = PromotionRequest.objects.create(
        tenant=tenant,
        model_version=model_version,
        target=target,
        artifact_sha256=model_version.sha256,
        requested_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    reusable = _reusable_evaluations(model_version)
    wanted = evaluation_services.default_evaluation_versions(
        tenant=tenant, model_kind=model_version.registered_model.kind
    )
    missing = [v for v, _ in wanted if v.pk not in reusable]
    created: list[Evaluation] = []
    if missing:
        created = evaluation_services.evaluation_request(
            actor=actor,
            tenant=tenant,
            model_version=model_version,
            dataset_versions=missing,
            via=via,
        )
    promotion.evaluation_ids = [reusable[v.pk].pk for v, _ in wanted if v.pk in reusable] + [
        e.pk for e in created
    ]
    promotion.save(update_fields=["evaluation_ids"])
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="promotion.request",
        obj=promotion,
        after={
            "model_version": model_version.pk,
            "target": target,
            "evaluations": promotion.evaluation_ids,
        },
        via=via,
    )
    transaction.on_commit(lambda: _enqueue_check(promotion.pk))
    return promotion


def _champion(version: ModelVersion) -> ModelVersion | None:
    return (
        ModelVersion.objects.filter(
            registered_model=version.registered_model, stage=Stage.PRODUCTION
        )
        .exclude(pk=version.pk)
        .order_by("-number")
        .first()
    )


def _gate_dataset_versions(evaluations: list[Evaluation]) -> list[dict[str, Any]]:
    """What the gates measured against, as the reviewer sees it: each dataset version by
    id, number and sha256, and who uploaded it (for a tenant's own set)."""
    rows: list[dict[str, Any]] = []
    for e in sorted(evaluations, key=lambda e: (e.dataset_version.dataset.name, e.pk)):
        version, dataset = e.dataset_version, e.dataset_version.dataset
        shared = dataset.tenant_id is None
        uploader = None if shared or version.created_by is None else version.created_by.username
        rows.append({
            "id": version.pk, "dataset": dataset.pk, "dataset_name": dataset.name,
            "kind": dataset.kind, "number": version.number, "sha256": version.sha256,
            "rows": version.rows, "shared": shared, "uploaded_by": uploader,
            "evaluation": e.pk,
        })  # fmt: skip
    return rows


def _results(evaluations: list[Evaluation]) -> dict[str, dict[str, Any]]:
    return {
        e.dataset_version.dataset_id: {**e.metrics, "dataset_name": e.dataset_version.dataset.name}
        for e in evaluations
    }


def _base_results(evaluations: list[Evaluation]) -> dict[str, dict[str, Any]]:
    """The yardstick measured beside each evaluation (an embedding model's un-tuned base,
    an autocomplete model's trigram), by dataset."""
    return {
        e.dataset_version.dataset_id: {
            **e.base_metrics,
            "dataset_name": e.dataset_version.dataset.name,
        }
        for e in evaluations
        if isinstance(e.base_metrics, dict) and e.base_metrics
    }


def promotion_check(*, promotion_id: str) -> PromotionRequest | None:
    """Move a checking request on once all its evaluations have finished."""
    with transaction.atomic():
        promotion = (
            PromotionRequest.objects.select_for_update()
            .filter(pk=promotion_id, status=PromotionStatus.CHECKING)
            .first()
        )
        if promotion is None:
            return None
        evaluations = list(
            Evaluation.objects.filter(pk__in=promotion.evaluation_ids).select_related(
                "dataset_version__dataset", "dataset_version__created_by"
            )
        )
        if any(e.status in (EvalStatus.QUEUED, EvalStatus.RUNNING) for e in evaluations):
            return promotion
        failed = [e for e in evaluations if e.status == EvalStatus.FAILED]
        if failed or not evaluations:
            promotion.status = PromotionStatus.FAILED
            promotion.failure = (
                "no golden or sample dataset to evaluate on"
                if not evaluations
                else f"evaluation {failed[0].pk} failed: {failed[0].error}"
            )
        else:
            version = promotion.model_version
            policy = evaluation_services.policy_for(
                tenant=promotion.tenant, model_kind=version.registered_model.kind
            )
            champion = _champion(version)
            champion_results = None
            if champion is not None:
                theirs = (
                    Evaluation.objects.filter(
                        model_version=champion,
                        status=EvalStatus.SUCCEEDED,
                        dataset_version_id__in=[e.dataset_version_id for e in evaluations],
                    )
                    .select_related("dataset_version__dataset")
                    .order_by("created_at")
                )
                champion_results = _results(list(theirs))
            champion_names = dict.fromkeys(champion_results or {}, "champion")
            kind = version.registered_model.kind
            yardstick = evaluation_services.BASE_YARDSTICK.get(kind)
            if yardstick is not None:
                # The yardstick measured beside the version is the champion wherever no
                # production version was measured: a tuned embedding model must at least
                # match its un-tuned base, an autocomplete model the tenant's word trigram.
                for dataset, base in _base_results(evaluations).items():
                    if dataset not in champion_names:
                        champion_results = {**(champion_results or {}), dataset: base}
                        champion_names[dataset] = yardstick
            promotion.champion = champion
            promotion.gate_dataset_versions = _gate_dataset_versions(evaluations)
            promotion.gate_results = check_gates(
                gates=policy.gates,
                results=_results(evaluations),
                latency_budget_ms=policy.latency_budget_ms,
                max_regression=policy.max_regression_vs_champion,
                champion=champion_results,
                regression_metrics=evaluation_services.regression_metrics(kind),
                champion_names=champion_names,
                latency_metric=evaluation_services.latency_budget_metric(kind),
            )
            passed = all(row["passed"] for row in promotion.gate_results)
            promotion.status = (
                PromotionStatus.AWAITING_APPROVAL if passed else PromotionStatus.GATES_FAILED
            )
        promotion.save()
        audit_record(
            actor=None,
            tenant=promotion.tenant,
            verb=f"promotion.{promotion.status}",
            obj=promotion,
            before={"status": PromotionStatus.CHECKING},
            after={
                "status": promotion.status,
                "failing_gates": [r for r in promotion.gate_results if not r["passed"]],
                "dataset_versions": [v["id"] for v in promotion.gate_dataset_versions],
            },
            via="task",
        )
        if promotion.status == PromotionStatus.AWAITING_APPROVAL:
            transaction.on_commit(lambda: _notify_reviewers(promotion))
        transaction.on_commit(lambda: _nudge_campaign(promotion.pk))
    return promotion


def _nudge_campaign(promotion_id: str) -> None:
    from apps.campaigns.services import nudge_for_promotion

    nudge_for_promotion(promotion_id)


def _can_review(user: Any, tenant: Tenant) -> bool:
    """A reviewer or admin of the tenant, or a holder of the org-level reviewer role."""
    from apps.tenants.models import OrgRole
    from apps.tenants.users import holds_org_role

    membership = Membership.objects.filter(user=user, tenant=tenant).first()
    if membership is not None and ROLE_RANK[Role(membership.role)] >= ROLE_RANK[Role.REVIEWER]:
        return True
    return holds_org_role(user, OrgRole.REVIEWER)


def _decide(
    *, actor: Any, promotion: PromotionRequest, approve: bool, comment: str, via: str
) -> PromotionRequest:
    with transaction.atomic():
        locked = (
            PromotionRequest.objects.select_for_update()
            .select_related("model_version__registered_model", "model_version__run", "tenant")
            .get(pk=promotion.pk)
        )
        if locked.status != PromotionStatus.AWAITING_APPROVAL:
            raise DomainError(
                f"This request is {locked.status}; only a request awaiting "
                "approval can be decided.",
                code="illegal_transition",
                status=locked.status,
            )
        if locked.requested_by_id is None:
            # The requester's account was deleted (SET_NULL): nobody could tell the decider
            # from the requester, so no one decides; a fresh request has a known requester.
            raise DomainError(
                "Nobody is on record as the requester of this promotion (their account was "
                "deleted), so four eyes cannot be shown; request the promotion again.",
                code="requester_unknown",
                status=locked.status,
            )
        if locked.requested_by_id == actor.pk:
            raise DomainError(
                "You requested this promotion; another reviewer must decide it.",
                code="four_eyes",
                status=locked.status,
            )
        if not _can_review(actor, locked.tenant):
            raise DomainError(
                "Only reviewers and admins of this tenant (or org-level reviewers) decide "
                "promotions.",
                code="not_reviewer",
                status=locked.status,
            )
        version = locked.model_version
        if approve:
            _check_trainer(actor=actor, promotion=locked)
        if approve and version.sha256 != locked.artifact_sha256:
            raise DomainError(
                "The model's bytes changed since they were evaluated.",
                code="artifact_mismatch",
                status=locked.status,
            )
        locked.status = PromotionStatus.APPROVED if approve else PromotionStatus.REJECTED
        locked.decided_by = actor
        locked.decision_comment = comment
        locked.decided_at = timezone.now()
        locked.save()
        if approve:
            ModelVersion.objects.filter(
                registered_model=version.registered_model, stage=locked.target
            ).exclude(pk=version.pk).update(
                stage=Stage.ARCHIVED if locked.target == Target.PRODUCTION else Stage.NONE
            )
            version.stage = locked.target
            version.aliases = sorted({*version.aliases, locked.target})
            version.save(update_fields=["stage", "aliases"])
            transaction.on_commit(lambda: _set_mlflow_alias(version, locked.target))
        audit_record(
            actor=actor,
            tenant=locked.tenant,
            verb=f"promotion.{locked.status}",
            obj=locked,
            before={"status": PromotionStatus.AWAITING_APPROVAL},
            after={
                "status": locked.status,
                "comment": comment,
                "artifact_sha256": locked.artifact_sha256,
            },
            via=via,
        )
        if approve:
            # The approved bytes go live through a deployment; the request follows it
            # (deploying -> done | failed).
            from apps.deployments.services import deployment_create

            deployment_create(actor=actor, promotion=locked, via=via)
        transaction.on_commit(lambda: _notify_requester(locked))
    return locked


def _check_trainer(*, actor: Any, promotion: PromotionRequest) -> None:
    """Unless the policy lets trainers approve, the user who launched the version's training
    run may not approve it, nor may anyone a version whose trainer is unknown."""
    version = promotion.model_version
    policy = evaluation_services.policy_for(
        tenant=promotion.tenant, model_kind=version.registered_model.kind
    )
    if policy.trainer_may_approve:
        return
    trainer_id = version.run.created_by_id
    if trainer_id is None:
        raise DomainError(
            "Nobody is on record as the trainer of this version (their account was deleted), "
            "and the policy forbids its trainer to approve it; retrain it to promote it.",
            code="trainer_unknown",
            status=promotion.status,
        )
    if trainer_id == actor.pk:
        raise DomainError(
            "You trained this version; the policy asks another reviewer to approve it.",
            code="trainer_cannot_approve",
            status=promotion.status,
        )


def promotion_approve(
    *, actor: Any, promotion: PromotionRequest, comment: str = "", via: str = ""
) -> PromotionRequest:
    return _decide(actor=actor, promotion=promotion, approve=True, comment=comment, via=via)


def promotion_reject(
    *, actor: Any, promotion: PromotionRequest, comment: str = "", via: str = ""
) -> PromotionRequest:
    return _decide(actor=actor, promotion=promotion, approve=False, comment=comment, via=via)


def _set_mlflow_alias(version: ModelVersion, alias: str) -> None:
    if not version.mlflow_version:
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=settings.MLFLOW_TRACKING_URI).set_registered_model_alias(
            version.registered_model.mlflow_name, alias, version.mlflow_version
        )
    except Exception:
        log.warning("could not move the MLflow alias", exc_info=True)


def _notify_reviewers(promotion: PromotionRequest) -> None:
    reviewers = (
        Membership.objects.filter(tenant=promotion.tenant, role__in=[Role.REVIEWER, Role.ADMIN])
        .exclude(user=promotion.requested_by)
        .select_related("user")
    )
    emails = sorted({m.user.email for m in reviewers if m.user.email})
    if emails:
        version = promotion.model_version
        send_mail(
            f"[workbench] {version} awaits your approval for {promotion.target}",
            f"{version} passed every gate of {promotion.tenant.slug}'s policy and awaits a "
            f"reviewer's decision (request {promotion.pk}).",
            settings.DEFAULT_FROM_EMAIL,
            emails,
            fail_silently=True,
        )


def _notify_requester(promotion: PromotionRequest) -> None:
    user = promotion.requested_by
    if user is not None and user.email:
        rejected = promotion.status == PromotionStatus.REJECTED
        verdict = "rejected" if rejected else "approved"
        then = "" if rejected else f" It is being deployed to {promotion.target} now."
        send_mail(
            f"[workbench] your {promotion.target} request was {verdict}",
            f"{promotion.model_version}: {verdict} by {promotion.decided_by}.{then}"
            f"\n\n{promotion.decision_comment}",
            settings.DEFAULT_FROM_EMAIL,
            [user.email],
            fail_silently=True,
        )


# --- after approval: the deployment reports, the promotion records -----------------------
# Only this module changes a promotion's status; apps.deployments calls these three.


def promotion_deploying(*, promotion: PromotionRequest, deployment_id: str) -> None:
    """approved -> deploying: its deployment was created (inside the approval's
    transaction)."""
    _after_approval(
        promotion_id=promotion.pk,
        expected=PromotionStatus.APPROVED,
        status=PromotionStatus.DEPLOYING,
        deployment_id=deployment_id,
    )
    promotion.status = PromotionStatus.DEPLOYING


def promotion_deployed(*, promotion_id: str, deployment_id: str) -> None:
    """deploying -> done: its deployment is warm."""
    _after_approval(
        promotion_id=promotion_id,
        expected=PromotionStatus.DEPLOYING,
        status=PromotionStatus.DONE,
        deployment_id=deployment_id,
    )


def promotion_deploy_failed(*, promotion_id: str, deployment_id: str, reason: str) -> None:
    """deploying -> failed: its deployment failed (whatever served before still does)."""
    _after_approval(
        promotion_id=promotion_id,
        expected=PromotionStatus.DEPLOYING,
        status=PromotionStatus.FAILED,
        deployment_id=deployment_id,
        failure=reason,
    )


def _after_approval(
    *, promotion_id: str, expected: str, status: str, deployment_id: str, failure: str = ""
) -> None:
    with transaction.atomic():
        locked = PromotionRequest.objects.select_for_update().filter(pk=promotion_id).first()
        if locked is None or locked.status != expected:
            return  # already moved on (a repeated report changes nothing)
        locked.status = status
        fields = ["status"]
        if failure:
            locked.failure = failure[-4000:]
            fields.append("failure")
        locked.save(update_fields=fields)
        audit_record(
            actor=None,
            tenant=locked.tenant,
            verb=f"promotion.{status}",
            obj=locked,
            before={"status": expected},
            after={
                "status": status,
                "deployment": deployment_id,
                **({"failure": failure[:1000]} if failure else {}),
            },
            via="task",
        )
