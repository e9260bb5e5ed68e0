"""Dashboard pages for batch predictions: the tenant's jobs with a form to start one, and
one job's page (progress that follows itself, throughput, a preview of the output — labels,
vectors or completions by the model's kind — the predicted labels' distribution, download,
register as a sample dataset, cancel)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from apps.batch import services
from apps.batch.models import ACTIVE, BatchPrediction, BatchStatus, OutputFormat
from apps.core.errors import DomainError, InvalidInput
from apps.datasets.charts import label_chart
from apps.datasets.models import DatasetKind, DatasetVersion
from apps.registry.models import ModelKind, ModelVersion
from apps.tenants.dashboard import VIA, paginate, render_tenant, require_role, tenant_view
from apps.tenants.models import Role
from apps.tenants.scoping import TenantAccess
from worker import autocomplete_text as limits

SECTION = "batch-list-page"
PER_PAGE = 25
CHOICES_MAX = 100  # versions offered in the form's menus (the newest)


class BatchForm(forms.Form):
    model_version = forms.ChoiceField(label="Model version")
    dataset_version = forms.ChoiceField(label="Dataset version")
    text_column = forms.CharField(
        required=False, max_length=100, help_text="Empty: the version's own text column."
    )
    output_format = forms.ChoiceField(
        choices=[("", "The model's default (JSON lines; vectors: .npy)"), *OutputFormat.choices],
        required=False,
        help_text="Classifier and autocomplete: JSON lines or CSV; embedding: .npy, Parquet "
        "or JSON lines.",
    )
    top_k = forms.IntegerField(
        min_value=1, max_value=services.MAX_TOP_K, initial=3, label="Top k",
        help_text="Classifier: the most likely labels kept per row.",
    )  # fmt: skip
    role = forms.ChoiceField(
        choices=[("query", "query"), ("document", "document")], initial="query", required=False,
        help_text="Embedding: which encoder embeds the texts.",
    )  # fmt: skip
    context_column = forms.CharField(
        required=False, max_length=100,
        help_text="Autocomplete: the customer messages (empty: a reply dataset's own).",
    )  # fmt: skip
    max_tokens = forms.IntegerField(
        min_value=1, max_value=limits.MAX_TOKENS_LIMIT, initial=limits.MAX_TOKENS_DEFAULT,
        required=False,
        help_text="Autocomplete: tokens per completion at most.",
    )  # fmt: skip
    completions = forms.IntegerField(
        min_value=1, max_value=limits.N_LIMIT, initial=1, required=False,
        help_text="Autocomplete: completions per row, best first.",
    )  # fmt: skip

    def __init__(self, *args: Any, tenant: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        versions = (
            ModelVersion.objects.filter(registered_model__tenant=tenant)
            .select_related("registered_model")
            .order_by("-created_at")[:CHOICES_MAX]
        )
        self.fields["model_version"].choices = [  # type: ignore[attr-defined]
            (v.pk, f"{v.registered_model.name} v{v.number} · {v.registered_model.kind}"
             + (f" ({v.stage})" if v.stage != "none" else ""))
            for v in versions
        ]  # fmt: skip
        data = (
            DatasetVersion.objects.filter(dataset__tenant=tenant)
            .select_related("dataset")
            .order_by("-created_at")[:CHOICES_MAX]
        )
        self.fields["dataset_version"].choices = [  # type: ignore[attr-defined]
            (d.pk, f"{d.dataset.name} v{d.number} · {d.dataset.task} ({d.rows} rows)") for d in data
        ]


def _jobs(access: TenantAccess) -> Any:
    return BatchPrediction.objects.filter(tenant=access.tenant).select_related(
        "model_version__registered_model", "dataset_version__dataset", "created_by"
    )


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def batch_list(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    can_write = access.allows(Role.SCIENTIST)
    form = BatchForm(tenant=access.tenant) if can_write else None
    status = 200
    if request.method == "POST":
        require_role(access, Role.SCIENTIST)
        form = BatchForm(request.POST, tenant=access.tenant)
        if form.is_valid():
            try:
                job = services.batch_create(
                    actor=request.user,
                    tenant=access.tenant,
                    model_version=ModelVersion.objects.select_related("registered_model").get(
                        pk=form.cleaned_data["model_version"]
                    ),
                    dataset_version=DatasetVersion.objects.select_related("dataset").get(
                        pk=form.cleaned_data["dataset_version"]
                    ),
                    text_column=form.cleaned_data["text_column"],
                    output_format=form.cleaned_data["output_format"],
                    top_k=form.cleaned_data["top_k"],
                    role=form.cleaned_data["role"],
                    context_column=form.cleaned_data["context_column"] or None,
                    max_tokens=form.cleaned_data["max_tokens"] or 0,
                    completions=form.cleaned_data["completions"] or 1,
                    via=VIA,
                )
            except InvalidInput as exc:
                form.add_error(next(iter(exc.fields), None), exc.message)
            else:
                messages.success(request, f"Batch prediction {job.pk} queued.")
                return redirect("batch-detail-page", tenant=access.tenant.slug, batch_id=job.pk)
        status = 400
    page = paginate(request, _jobs(access), PER_PAGE)
    return render_tenant(
        request,
        access,
        "batch/list.html",
        {"page": page, "form": form, "live": any(j.status in ACTIVE for j in page)},
        section=SECTION,
        status=status,
    )


def _job(access: TenantAccess, batch_id: str) -> BatchPrediction:
    found = _jobs(access).filter(pk=batch_id).first()
    if found is None:
        raise Http404("No such batch prediction.")
    return found


@require_http_methods(["GET", "HEAD"])
@tenant_view
def batch_detail(request: HttpRequest, access: TenantAccess, batch_id: str) -> HttpResponse:
    job = _job(access, batch_id)
    context = {
        "job": job,
        "live": job.status in ACTIVE,
        "percent": round(100 * job.rows_done / job.rows_total, 1) if job.rows_total else 0.0,
        "chart": label_chart(job.label_counts) if job.label_counts else None,
        "can_write": access.allows(Role.SCIENTIST),
        "can_register": access.allows(Role.REVIEWER)
        and job.status == BatchStatus.SUCCEEDED
        and job.model_kind != ModelKind.EMBEDDING,
        "samples": DatasetVersion.objects.filter(
            dataset__tenant=access.tenant, dataset__kind=DatasetKind.SAMPLE
        )
        .values_list("dataset__name", flat=True)
        .distinct(),
    }
    template = "batch/_live.html" if request.GET.get("partial") == "1" else "batch/detail.html"
    response = render_tenant(request, access, template, context, section=SECTION)
    if template == "batch/_live.html":
        response["Cache-Control"] = "no-store"
    return response


@require_POST
@tenant_view
def batch_cancel(request: HttpRequest, access: TenantAccess, batch_id: str) -> HttpResponse:
    require_role(access, Role.SCIENTIST)
    job = _job(access, batch_id)
    try:
        services.batch_cancel(actor=request.user, job=job, via=VIA)
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "Cancelled." if job.queued_at is None else "Cancelling…")
    return redirect("batch-detail-page", tenant=access.tenant.slug, batch_id=job.pk)


@require_POST
@tenant_view
def batch_register(request: HttpRequest, access: TenantAccess, batch_id: str) -> HttpResponse:
    require_role(access, Role.REVIEWER)
    job = _job(access, batch_id)
    name = request.POST.get("dataset_name", "").strip()[:100]
    if not name:
        messages.error(request, "Name the sample dataset the predictions go into.")
    else:
        try:
            version = services.batch_register(
                actor=request.user, job=job, dataset_name=name, via=VIA
            )
        except (DomainError, InvalidInput) as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Registered as {version.dataset.name} v{version.number}.")
    return redirect("batch-detail-page", tenant=access.tenant.slug, batch_id=job.pk)
