"""Dashboard pages for training runs: list + launch, detail, cancel, rerun, compare.

The runs list and a run's page refresh themselves while work is under way: the page is
served whole, and ``?partial=1`` returns just its live region for the small poller in
``static/js/workbench.js`` (without script: a refresh link, or a meta refresh on a run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from apps.core.errors import DomainError, InvalidInput
from apps.datasets.models import DatasetKind
from apps.datasets.selectors import datasets_for_tenant
from apps.registry.selectors import models_for_tenant
from apps.tenants.dashboard import VIA, paginate, render_tenant, require_role, tenant_view
from apps.tenants.models import Role
from apps.tenants.scoping import TenantAccess
from apps.training import charts, selectors, services
from apps.training.filters import RunFilter
from apps.training.forms import RunLaunchForm
from apps.training.models import RunStatus, TrainingRun
from apps.training.tracking import mlflow_run_url
from worker.base_models import catalogue

RUNS_PER_PAGE = 25
SECTION = "run-list-page"
COMPARE_MIN, COMPARE_MAX = 2, 5
ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
# Scores where higher is better; any other metric (losses) is better lower.
HIGHER_IS_BETTER = (
    "val_macro_f1",
    "val_accuracy",
    "val_f1",
    "accuracy",
    "macro_f1",
    "val_recall_at_1",
    "val_recall_at_5",
    "val_recall_at_10",
    "val_mrr_at_10",
    "val_ndcg_at_10",
    "val_next_word_top1",
)
# The run list's score column: a classifier's macro-F1, an embedding model's MRR@10, an
# autocomplete model's next-word top-1.
KEY_METRICS = ("val_macro_f1", "val_mrr_at_10", "val_next_word_top1")
FILTER_FIELDS = ("status", "dataset", "base_model", "model")


@dataclass(frozen=True)
class RunRow:
    run: TrainingRun
    queue_position: int | None
    progress: charts.ProgressView | None
    duration: str

    @property
    def key_metric(self) -> float | None:
        metrics = self.run.metrics if isinstance(self.run.metrics, dict) else {}
        value = next((metrics[k] for k in KEY_METRICS if k in metrics), None)
        return float(value) if isinstance(value, int | float) else None


def _row(run: TrainingRun, positions: dict[str, int], now: Any) -> RunRow:
    return RunRow(
        run=run,
        queue_position=positions.get(run.pk),
        progress=charts.progress_view(run.progress) if run.status == RunStatus.RUNNING else None,
        duration=charts.elapsed(run.started_at, run.finished_at, now),
    )


def _run_or_404(access: TenantAccess, run_id: str) -> TrainingRun:
    run = selectors.runs_for_tenant(tenant=access.tenant).filter(pk=run_id).first()
    if run is None:
        raise Http404("No such run.")
    return run


def _partial(request: HttpRequest) -> bool:
    return request.GET.get("partial") == "1"


def _no_store(response: HttpResponse) -> HttpResponse:
    # Live regions change every second: never serve one from a cache.
    response["Cache-Control"] = "no-store"
    return response


# --- runs list and launch -----------------------------------------------------------------


def _launch(request: HttpRequest, access: TenantAccess, form: RunLaunchForm) -> TrainingRun | None:
    if not form.is_valid():
        return None
    data = form.cleaned_data
    try:
        return services.run_launch(
            actor=request.user,
            tenant=access.tenant,
            dataset_version=data["dataset_version"],
            validation_version=data["validation_version"],
            base_model=data["base_model"],
            params=form.params,
            model_name=data["model_name"],
            via=VIA,
        )
    except InvalidInput as exc:
        placed = False
        for name, errors in exc.fields.items():
            for error in errors:
                form.add_error(name if name in form.fields else None, error)
                placed = True
        if not placed:
            form.add_error(None, exc.message)
    return None


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def run_list(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    can_write = access.allows(Role.SCIENTIST)
    status = 200
    form: RunLaunchForm | None = None
    if request.method == "POST":
        require_role(access, Role.SCIENTIST)
        form = RunLaunchForm(request.POST, tenant=access.tenant)
        run = _launch(request, access, form)
        if run is not None:
            messages.success(request, f"Run {run.pk} queued.")
            url = reverse(
                "run-detail-page", kwargs={"tenant": access.tenant.slug, "run_id": run.pk}
            )
            # "#main": without a fragment of its own the redirect would keep the form's
            # "#launch", which the run's page does not have.
            return redirect(f"{url}#main")
        status = 400
    elif can_write and not _partial(request):
        form = RunLaunchForm(tenant=access.tenant)

    filterset = RunFilter(
        request.GET or None, queryset=selectors.runs_for_tenant(tenant=access.tenant)
    )
    page = paginate(request, filterset.qs, RUNS_PER_PAGE)
    positions = selectors.queue_positions(tenant=access.tenant)
    now = timezone.now()
    rows = [_row(run, positions, now) for run in page.object_list]
    context: dict[str, Any] = {
        "page": page,
        "rows": rows,
        "live": any(row.run.status in ACTIVE for row in rows) or bool(positions),
        "filtered": any(request.GET.get(name) for name in filterset.filters),
    }
    if _partial(request):
        return _no_store(
            render_tenant(request, access, "training/_run_table.html", context, section=SECTION)
        )
    context.update(
        {
            "filter": filterset,
            "form": form,
            "status_choices": RunStatus.choices,
            "datasets": datasets_for_tenant(tenant=access.tenant).filter(kind=DatasetKind.TRAINING),
            "base_models": catalogue(),
            "model_names": models_for_tenant(tenant=access.tenant).values_list("name", flat=True),
            "compare_min": COMPARE_MIN,
            "compare_max": COMPARE_MAX,
        }
    )
    return render_tenant(
        request, access, "training/run_list.html", context, section=SECTION, status=status
    )


# --- one run ------------------------------------------------------------------------------


def _metric_rows(run: TrainingRun) -> list[charts.MetricRow]:
    return list(selectors.metric_points(run=run).values_list("name", "step", "epoch", "value"))


@require_http_methods(["GET", "HEAD"])
@tenant_view
def run_detail(request: HttpRequest, access: TenantAccess, run_id: str) -> HttpResponse:
    run = _run_or_404(access, run_id)
    run_charts = charts.run_charts(charts.group_points(_metric_rows(run)))
    positions = selectors.queue_positions(tenant=access.tenant) if run.status == "queued" else {}
    context = {
        "run": run,
        "row": _row(run, positions, timezone.now()),
        "progress": charts.progress_view(run.progress),
        "live": run.status in ACTIVE,
        "can_write": access.allows(Role.SCIENTIST),
        "charts": run_charts,
        # An autocomplete run's held-out prefixes with its best model's greedy completions.
        "samples": run.samples if isinstance(run.samples, list) else [],
        "params": [(k, _shown(v)) for k, v in sorted(run.params.items())]
        if isinstance(run.params, dict)
        else [],
        "environment": sorted(run.environment.items()) if isinstance(run.environment, dict) else [],
        "final_metrics": sorted(run.metrics.items()) if isinstance(run.metrics, dict) else [],
        "mlflow_url": mlflow_run_url(run.mlflow_run_id),
        "model_version": getattr(run, "model_version", None),
    }
    if _partial(request):
        return _no_store(
            render_tenant(request, access, "training/_run_live.html", context, section=SECTION)
        )
    return render_tenant(request, access, "training/run_detail.html", context, section=SECTION)


@require_POST
@tenant_view
def run_cancel(request: HttpRequest, access: TenantAccess, run_id: str) -> HttpResponse:
    run = _run_or_404(access, run_id)
    require_role(access, Role.SCIENTIST)
    try:
        cancelled = services.run_cancel(actor=request.user, run=run, via=VIA)
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        if cancelled.status == RunStatus.CANCELLED:
            messages.success(request, f"Run {run.pk} cancelled.")
        else:
            messages.info(request, f"Run {run.pk} was asked to stop; it does within seconds.")
    return redirect("run-detail-page", tenant=access.tenant.slug, run_id=run.pk)


@require_POST
@tenant_view
def run_rerun(request: HttpRequest, access: TenantAccess, run_id: str) -> HttpResponse:
    run = _run_or_404(access, run_id)
    require_role(access, Role.SCIENTIST)
    try:
        again = services.run_rerun(actor=request.user, run=run, via=VIA)
    except (InvalidInput, DomainError) as exc:
        messages.error(request, exc.message)
        return redirect("run-detail-page", tenant=access.tenant.slug, run_id=run.pk)
    messages.success(request, f"Run {again.pk} queued with the configuration of run {run.pk}.")
    return redirect("run-detail-page", tenant=access.tenant.slug, run_id=again.pk)


# --- compare ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    text: str
    highlight: bool = False


@dataclass(frozen=True)
class CompareRow:
    name: str
    cells: list[Cell]
    differs: bool = False


def _shown(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):  # lora_target_modules
        return ", ".join(_shown(item) for item in value)
    return str(value)


def _param_rows(runs: Sequence[TrainingRun]) -> list[CompareRow]:
    rows: list[CompareRow] = []
    fixed: list[tuple[str, list[Any]]] = [
        ("base_model", [r.base_model for r in runs]),
        (
            "dataset_version",
            [f"{r.dataset_version.dataset.name} v{r.dataset_version.number}" for r in runs],
        ),
        (
            "validation_version",
            [
                f"{r.validation_version.dataset.name} v{r.validation_version.number}"
                if r.validation_version
                else None
                for r in runs
            ],
        ),
    ]
    names = sorted({name for r in runs for name in (r.params or {})})
    params = [(name, [(r.params or {}).get(name) for r in runs]) for name in names]
    for name, values in [*fixed, *params]:
        shown = [_shown(v) for v in values]
        differs = len(set(shown)) > 1
        rows.append(
            CompareRow(
                name=name, cells=[Cell(text, highlight=differs) for text in shown], differs=differs
            )
        )
    return rows


def _final_metrics(run: TrainingRun, points: dict[str, list[charts.MetricRow]]) -> dict[str, Any]:
    """The run's recorded result, or for a run still going its latest validation values."""
    if isinstance(run.metrics, dict) and run.metrics:
        return dict(run.metrics)
    return {name: rows[-1][3] for name, rows in points.items() if name.startswith("val_")}


def _rounded(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(f"{value:.6g}")
    return value


def _metric_rows_compared(finals: Sequence[dict[str, Any]]) -> list[CompareRow]:
    rows: list[CompareRow] = []
    for name in sorted({name for final in finals for name in final}):
        # Compared as shown (6 significant digits), so 0.65 and 0.6499999999 tie.
        values = [_rounded(final.get(name)) for final in finals]
        numbers = [v for v in values if isinstance(v, float)]
        best = None
        if len(numbers) > 1 and len(set(numbers)) > 1:
            best = max(numbers) if name in HIGHER_IS_BETTER else min(numbers)
        rows.append(
            CompareRow(
                name=name,
                cells=[Cell(_shown(v), highlight=best is not None and v == best) for v in values],
            )
        )
    return rows


@require_http_methods(["GET", "HEAD"])
@tenant_view
def run_compare(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    ids = list(dict.fromkeys(i for i in request.GET.getlist("runs") if i))  # dedupe, in order
    context: dict[str, Any] = {"count": len(ids), "min": COMPARE_MIN, "max": COMPARE_MAX}
    if not COMPARE_MIN <= len(ids) <= COMPARE_MAX:
        return render_tenant(
            request, access, "training/run_compare.html", context, section=SECTION, status=400
        )
    found = {r.pk: r for r in selectors.runs_for_tenant(tenant=access.tenant).filter(pk__in=ids)}
    if len(found) != len(ids):  # unknown and other tenants' ids read the same
        raise Http404("No such run.")
    runs = [found[i] for i in ids]
    points = [charts.group_points(_metric_rows(run)) for run in runs]

    def label(run: TrainingRun) -> str:
        return f"{run.pk} · {run.model_name}"

    f1_chart = charts.line_chart(
        chart_id="compare-f1-chart",
        title="Validation macro-F1 per epoch",
        x_label="epoch",
        y_label="val_macro_f1",
        series=[
            charts.SeriesData(
                name=run.pk, label=label(run), points=charts.by_epoch(p.get("val_macro_f1", []))
            )
            for run, p in zip(runs, points, strict=True)
        ],
        y_range=(0.0, 1.0),
    )
    loss_chart = charts.line_chart(
        chart_id="compare-loss-chart",
        title="Training loss per step",
        x_label="step",
        y_label="train_loss",
        series=[
            charts.SeriesData(
                name=run.pk, label=label(run), points=charts.by_step(p.get("train_loss", []))
            )
            for run, p in zip(runs, points, strict=True)
        ],
        x_from_zero=True,
    )
    now = timezone.now()
    context.update(
        {
            "runs": [
                {"run": run, "color": charts.color(i), "row": _row(run, {}, now)}
                for i, run in enumerate(runs)
            ],
            "charts": [f1_chart, loss_chart],
            "param_rows": _param_rows(runs),
            "metric_rows": _metric_rows_compared(
                [_final_metrics(run, p) for run, p in zip(runs, points, strict=True)]
            ),
        }
    )
    return render_tenant(request, access, "training/run_compare.html", context, section=SECTION)
