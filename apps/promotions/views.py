"""Dashboard pages for promotion requests: the review queue, one request, the decisions.

Reviewers and admins approve or reject from the queue or the request's page (a
``data-confirm`` form: one click and a confirmation; without script the POST goes straight
through). Everyone else in the tenant sees the same pages read-only; scientists and up may
request a promotion from the queue. Decisions go through ``services.promotion_approve`` /
``promotion_reject``, whose ``DomainError`` (four eyes, an illegal transition) is shown as
an error message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from apps.core.errors import DomainError
from apps.evaluation import services as evaluation_services
from apps.evaluation.models import EvalStatus, Evaluation
from apps.promotions import charts, services
from apps.promotions.forms import DecisionForm, PromotionRequestForm
from apps.promotions.models import PromotionRequest, PromotionStatus
from apps.tenants.dashboard import VIA, paginate, render_tenant, require_role, tenant_view
from apps.tenants.models import Role
from apps.tenants.scoping import TenantAccess

SECTION = "review-queue-page"
PER_PAGE = 25
QUEUE_STATUSES = (
    PromotionStatus.AWAITING_APPROVAL,
    PromotionStatus.CHECKING,
    PromotionStatus.GATES_FAILED,
    PromotionStatus.DEPLOYING,
    PromotionStatus.DONE,
    PromotionStatus.FAILED,
    PromotionStatus.APPROVED,
    PromotionStatus.REJECTED,
)
DEFAULT_STATUS = PromotionStatus.AWAITING_APPROVAL
ALL = "all"
# An embedding evaluation's table: (key, label, higher is better), beside the base's and
# the champion's; and how many of its wrong queries the page lists.
RETRIEVAL_COMPARED = (
    ("recall_at_1", "Recall@1", True),
    ("recall_at_5", "Recall@5", True),
    ("recall_at_10", "Recall@10", True),
    ("mrr_at_10", "MRR@10", True),
    ("ndcg_at_10", "nDCG@10", True),
    ("latency_ms_p50", "Encode p50 (ms / batch)", False),
    ("latency_ms_p95", "Encode p95 (ms / batch)", False),
)
WRONG_QUERIES_SHOWN = 50
# An autocomplete evaluation's table, beside the trigram's and the champion's.
AUTOCOMPLETE_COMPARED = (
    ("next_word_top1", "Next word, top-1", True),
    ("next_word_top3", "Next word, top-3", True),
    ("exact_match", "Exact match (held-out halves)", True),
    ("keystrokes_saved", "Keystrokes saved", True),
    ("perplexity", "Perplexity", False),
    ("latency_ms_per_token_p50", "Latency p50 (ms / token)", False),
    ("latency_ms_per_token_p95", "Latency p95 (ms / token)", False),
)
# Metrics compared with the champion's: (key, label, higher is better).
COMPARED = (
    ("accuracy", "Accuracy", True),
    ("macro_f1", "Macro-F1", True),
    ("ece", "ECE", False),
    ("latency_ms_p50", "Latency p50 (ms)", False),
    ("latency_ms_p95", "Latency p95 (ms)", False),
)


# --- queries ------------------------------------------------------------------------------


def _promotions(access: TenantAccess) -> Any:
    return PromotionRequest.objects.filter(tenant=access.tenant).select_related(
        "model_version__registered_model", "requested_by", "decided_by", "campaign_item__campaign"
    )


def _promotion_or_404(access: TenantAccess, promotion_id: str) -> PromotionRequest:
    promotion = (
        _promotions(access)
        .select_related(
            "champion__registered_model",
            "model_version__run__created_by",
            "model_version__run__dataset_version__dataset",
        )
        .filter(pk=promotion_id)
        .first()
    )
    if promotion is None:
        raise Http404("No such promotion request.")
    return promotion


def _counts(access: TenantAccess) -> dict[str, int]:
    found = dict(
        PromotionRequest.objects.filter(tenant=access.tenant)
        .values_list("status")
        .annotate(n=Count("pk"))
        .values_list("status", "n")
    )
    return {str(status): int(found.get(status, 0)) for status in QUEUE_STATUSES}


# --- display helpers ----------------------------------------------------------------------


@dataclass(frozen=True)
class GateTally:
    passed: int
    failed: int

    @property
    def total(self) -> int:
        return self.passed + self.failed


def _tally(promotion: PromotionRequest) -> GateTally:
    rows = promotion.gate_results if isinstance(promotion.gate_results, list) else []
    passed = sum(1 for row in rows if isinstance(row, dict) and row.get("passed"))
    return GateTally(passed=passed, failed=len(rows) - passed)


@dataclass(frozen=True)
class QueueRow:
    promotion: PromotionRequest
    gates: GateTally
    can_decide: bool


def _shown(value: Any, key: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float | int):
        if key.startswith("latency_ms_per_token"):  # a trigram's are hundredths of a ms
            return f"{value:.2f}"
        if key.startswith("latency"):
            return f"{value:.1f}"
        if key == "peak_memory_bytes":
            return f"{value / 2**20:.1f} MiB"
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class MetricCell:
    key: str
    label: str
    ours: str
    theirs: str
    better: bool | None  # None: nothing to compare with


@dataclass(frozen=True)
class RetrievalCell:
    key: str
    label: str
    ours: str
    base: str
    champion: str
    vs_base: bool | None  # None: nothing to compare with, or equal
    vs_champion: bool | None


@dataclass(frozen=True)
class RetrievalView:
    """An embedding evaluation: its metrics beside the base's and the champion's, the
    recall@k curves, and the first of the queries it ranks wrong."""

    cells: list[RetrievalCell]
    chart: Any  # apps.training.charts.LineChart | None
    wrong: list[dict[str, Any]]
    wrong_count: int  # all the wrong queries measured
    wrong_kept: int  # those recorded (the tenant's own sets, capped)
    base_label: str


@dataclass(frozen=True)
class AutocompleteView:
    """An autocomplete evaluation: its figures beside the trigram's and the champion's (the
    same cells as an embedding model's, the trigram as the base), and the held-out
    completions it recorded."""

    cells: list[RetrievalCell]
    samples: list[dict[str, Any]]
    base_label: str
    shared: bool  # a shared golden set: its replies are not kept


@dataclass(frozen=True)
class EvaluationView:
    evaluation: Evaluation
    champion: Evaluation | None
    cells: list[MetricCell]
    heatmap: charts.HeatMap | None
    retrieval: RetrievalView | None = None
    autocomplete: AutocompleteView | None = None


def _number(metrics: Any, key: str) -> float | None:
    value = metrics.get(key) if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _cells(ours: Any, theirs: Any) -> list[MetricCell]:
    cells: list[MetricCell] = []
    for key, label, higher in COMPARED:
        mine, other = _number(ours, key), _number(theirs, key)
        better = None
        if mine is not None and other is not None and mine != other:
            better = mine > other if higher else mine < other
        cells.append(MetricCell(key, label, _shown(mine, key), _shown(other, key), better))
    return cells


def _better(mine: float | None, other: float | None, higher: bool) -> bool | None:
    if mine is None or other is None or mine == other:
        return None
    return mine > other if higher else mine < other


def _three_way(
    compared: tuple[tuple[str, str, bool], ...], ours: Any, base: Any, theirs: Any
) -> list[RetrievalCell]:
    """The version's metrics beside its yardstick's and the champion's."""
    cells = []
    for key, label, higher in compared:
        mine, b, c = _number(ours, key), _number(base, key), _number(theirs, key)
        cells.append(
            RetrievalCell(
                key=key, label=label, ours=_shown(mine, key), base=_shown(b, key),
                champion=_shown(c, key), vs_base=_better(mine, b, higher),
                vs_champion=_better(mine, c, higher),
            )
        )  # fmt: skip
    return cells


def _autocomplete_view(evaluation: Evaluation, champion: Evaluation | None) -> AutocompleteView:
    ours = evaluation.metrics if isinstance(evaluation.metrics, dict) else {}
    base = evaluation.base_metrics if isinstance(evaluation.base_metrics, dict) else {}
    theirs = champion.metrics if champion is not None and isinstance(champion.metrics, dict) else {}
    samples = evaluation.samples if isinstance(evaluation.samples, list) else []
    return AutocompleteView(
        cells=_three_way(AUTOCOMPLETE_COMPARED, ours, base, theirs),
        samples=[s for s in samples if isinstance(s, dict)],
        base_label="word trigram (its training replies)",
        shared=evaluation.dataset_version.dataset.tenant_id is None,
    )


def _retrieval_view(
    evaluation: Evaluation, champion: Evaluation | None, champion_name: str
) -> RetrievalView:
    ours = evaluation.metrics if isinstance(evaluation.metrics, dict) else {}
    base = evaluation.base_metrics if isinstance(evaluation.base_metrics, dict) else {}
    theirs = champion.metrics if champion is not None and isinstance(champion.metrics, dict) else {}
    cells = _three_way(RETRIEVAL_COMPARED, ours, base, theirs)
    base_label = f"un-tuned base ({base.get('base_model', 'base')})"
    dataset = evaluation.dataset_version.dataset.name
    chart = charts.recall_curve_chart(
        chart_id=f"recall-curve-{evaluation.pk}",
        title=f"Recall@k on {dataset} v{evaluation.dataset_version.number}, k = 1..20",
        curves=[
            ("version", "this version", ours.get("recall_curve")),
            ("base", base_label, base.get("recall_curve")),
            ("champion", f"champion ({champion_name})", theirs.get("recall_curve")),
        ],
    )
    recorded = evaluation.wrong_queries if isinstance(evaluation.wrong_queries, list) else []
    wrong = [w for w in recorded if isinstance(w, dict)][:WRONG_QUERIES_SHOWN]
    count = ours.get("wrong_queries")
    return RetrievalView(
        cells=cells,
        chart=chart,
        wrong=[{**w, "first": (w.get("ranked") or [{}])[0]} for w in wrong],
        wrong_count=count if isinstance(count, int) else len(recorded),
        wrong_kept=len(recorded),
        base_label=base_label,
    )


def _evaluation_views(promotion: PromotionRequest) -> list[EvaluationView]:
    evaluations = list(
        Evaluation.objects.filter(pk__in=promotion.evaluation_ids)
        .select_related("dataset_version__dataset")
        .order_by("dataset_version__dataset__name", "created_at")
    )
    theirs: dict[str, Evaluation] = {}
    if promotion.champion_id is not None:
        for evaluation in Evaluation.objects.filter(
            model_version_id=promotion.champion_id,
            status=EvalStatus.SUCCEEDED,
            dataset_version_id__in=[e.dataset_version_id for e in evaluations],
        ).order_by("created_at"):
            theirs[evaluation.dataset_version_id] = evaluation  # the latest wins
    views: list[EvaluationView] = []
    for evaluation in evaluations:
        champion = theirs.get(evaluation.dataset_version_id)
        metrics = evaluation.metrics if isinstance(evaluation.metrics, dict) else {}
        heatmap = None
        if "confusion" in metrics:
            dataset = evaluation.dataset_version.dataset.name
            heatmap = charts.confusion_heatmap(
                chart_id=f"confusion-{evaluation.pk}",
                title=f"Confusion matrix on {dataset} v{evaluation.dataset_version.number}",
                labels=metrics.get("labels") or [],
                matrix=metrics.get("confusion"),
            )
        retrieval = autocomplete = None
        if metrics.get("task") == "retrieval":
            retrieval = _retrieval_view(evaluation, champion, str(promotion.champion or ""))
        if metrics.get("task") == "text-generation":
            autocomplete = _autocomplete_view(evaluation, champion)
        views.append(
            EvaluationView(
                evaluation=evaluation,
                champion=champion,
                cells=_cells(metrics, champion.metrics if champion else None),
                heatmap=heatmap,
                retrieval=retrieval,
                autocomplete=autocomplete,
            )
        )
    return views


def _gate_rows(promotion: PromotionRequest) -> list[dict[str, Any]]:
    rows = promotion.gate_results if isinstance(promotion.gate_results, list) else []
    shown = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        metric = str(row.get("metric", ""))
        shown.append(
            {
                **row,
                "threshold_shown": _shown(row.get("threshold"), metric),
                "value_shown": _shown(row.get("value"), metric),
                "champion_shown": _shown(row.get("champion_value"), metric)
                if "champion_value" in row
                else "",
            }
        )
    return shown


# --- pages --------------------------------------------------------------------------------


def _request_promotion(
    request: HttpRequest, access: TenantAccess, form: PromotionRequestForm
) -> PromotionRequest | None:
    if not form.is_valid():
        return None
    try:
        return services.promotion_request(
            actor=request.user,
            tenant=access.tenant,
            model_version=form.cleaned_data["model_version"],
            target=form.cleaned_data["target"],
            via=VIA,
        )
    except DomainError as exc:
        form.add_error(None, exc.message)
    return None


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def review_queue(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    can_request = access.allows(Role.SCIENTIST)
    can_decide = access.allows(Role.REVIEWER)
    form: PromotionRequestForm | None = None
    status_code = 200
    if request.method == "POST":
        require_role(access, Role.SCIENTIST)
        form = PromotionRequestForm(request.POST, tenant=access.tenant)
        promotion = _request_promotion(request, access, form)
        if promotion is not None:
            messages.success(
                request,
                f"Promotion of {promotion.model_version} to {promotion.target} requested "
                f"({promotion.pk}); its evaluations run now.",
            )
            return redirect(
                "review-detail-page", tenant=access.tenant.slug, promotion_id=promotion.pk
            )
        status_code = 400
    elif can_request:
        form = PromotionRequestForm(tenant=access.tenant)

    status = request.GET.get("status") or DEFAULT_STATUS
    if status != ALL and status not in PromotionStatus.values:
        status = DEFAULT_STATUS
    queryset = _promotions(access)
    if status != ALL:
        queryset = queryset.filter(status=status)
    campaign = request.GET.get("campaign", "")[:32]
    if campaign:  # one campaign's requests in this tenant, together
        queryset = queryset.filter(campaign_item__campaign_id=campaign)
    page = paginate(request, queryset, PER_PAGE)
    rows = [
        QueueRow(
            promotion=p,
            gates=_tally(p),
            can_decide=can_decide
            and p.status == PromotionStatus.AWAITING_APPROVAL
            and p.requested_by_id is not None
            and p.requested_by_id != request.user.pk,
        )
        for p in page.object_list
    ]
    counts = _counts(access)
    context: dict[str, Any] = {
        "page": page,
        "rows": rows,
        "status": status,
        "tabs": [
            {"value": s.value, "label": s.label, "count": counts[s.value]} for s in QUEUE_STATUSES
        ],
        "counts": counts,
        "can_decide": can_decide,
        "form": form,
        "decision_form": DecisionForm(),
        "live": any(row.promotion.status == PromotionStatus.CHECKING for row in rows),
    }
    return render_tenant(
        request,
        access,
        "promotions/review_queue.html",
        context,
        section=SECTION,
        status=status_code,
    )


@require_http_methods(["GET", "HEAD"])
@tenant_view
def review_detail(request: HttpRequest, access: TenantAccess, promotion_id: str) -> HttpResponse:
    promotion = _promotion_or_404(access, promotion_id)
    can_decide = access.allows(Role.REVIEWER)
    version = promotion.model_version
    run = version.run
    dataset_version = run.dataset_version if run is not None else None
    dataset = dataset_version.dataset if dataset_version is not None else None
    policy = evaluation_services.policy_for(
        tenant=access.tenant, model_kind=version.registered_model.kind
    )
    context = {
        "promotion": promotion,
        "version": version,
        "run": run,
        "dataset_version": dataset_version,
        "dataset_link": dataset is not None and dataset.tenant_id == access.tenant.pk,
        "gates": _gate_rows(promotion),
        "tally": _tally(promotion),
        "evaluations": _evaluation_views(promotion),
        "can_decide": can_decide,
        "is_requester": promotion.requested_by_id == request.user.pk,
        "requester_unknown": promotion.requested_by_id is None,
        "trainer_barred": not policy.trainer_may_approve
        and run is not None
        and run.created_by_id == request.user.pk,
        "gate_datasets": promotion.gate_dataset_versions
        if isinstance(promotion.gate_dataset_versions, list)
        else [],
        "awaiting": promotion.status == PromotionStatus.AWAITING_APPROVAL,
        "live": promotion.status == PromotionStatus.CHECKING,
        "decision_form": DecisionForm(),
    }
    return render_tenant(request, access, "promotions/review_detail.html", context, section=SECTION)


def _back(request: HttpRequest, access: TenantAccess, promotion: PromotionRequest) -> str:
    if request.POST.get("back") == "queue":
        return reverse("review-queue-page", kwargs={"tenant": access.tenant.slug})
    return reverse(
        "review-detail-page",
        kwargs={"tenant": access.tenant.slug, "promotion_id": promotion.pk},
    )


def _decide(
    request: HttpRequest, access: TenantAccess, promotion_id: str, *, approve: bool
) -> HttpResponse:
    promotion = _promotion_or_404(access, promotion_id)
    require_role(access, Role.REVIEWER)
    form = DecisionForm(request.POST)
    if not form.is_valid():
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, f"Comment: {error}")
        return redirect(_back(request, access, promotion))
    decide = services.promotion_approve if approve else services.promotion_reject
    try:
        decided = decide(
            actor=request.user,
            promotion=promotion,
            comment=form.cleaned_data["comment"],
            via=VIA,
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        verb = "approved" if approve else "rejected"
        extra = f"; it is being deployed to {decided.target}" if approve else ""
        messages.success(request, f"{decided.model_version} {verb} for {decided.target}{extra}.")
    return redirect(_back(request, access, promotion))


@require_POST
@tenant_view
def review_approve(request: HttpRequest, access: TenantAccess, promotion_id: str) -> HttpResponse:
    return _decide(request, access, promotion_id, approve=True)


@require_POST
@tenant_view
def review_reject(request: HttpRequest, access: TenantAccess, promotion_id: str) -> HttpResponse:
    return _decide(request, access, promotion_id, approve=False)
