"""Dashboard pages for datasets: list and create, detail with versions, upload, delete."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST

from apps.core.errors import DomainError, InvalidInput
from apps.core.uploads import HashedUploadedFile, UploadTooLarge
from apps.datasets import charts, selectors, services
from apps.datasets.filters import DatasetFilter
from apps.datasets.forms import DatasetCreateForm, VersionUploadForm
from apps.datasets.models import Dataset, Task, writer_role
from apps.tenants.dashboard import (
    VIA,
    csrf_rejection,
    paginate,
    render_tenant,
    require_role,
    tenant_view,
)
from apps.tenants.models import Role
from apps.tenants.scoping import TenantAccess

DATASETS_PER_PAGE = 25
SECTION = "dataset-list-page"


def _dataset_or_404(access: TenantAccess, dataset_id: str) -> Dataset:
    dataset = selectors.datasets_for_tenant(tenant=access.tenant).filter(pk=dataset_id).first()
    if dataset is None:
        raise Http404("No such dataset.")
    return dataset


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def dataset_list(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    can_write = access.allows(Role.SCIENTIST)
    form = DatasetCreateForm() if can_write else None
    status = 200
    if request.method == "POST":
        require_role(access, Role.SCIENTIST)
        form = DatasetCreateForm(request.POST)
        if form.is_valid():
            # Golden and sample sets decide promotions: reviewers and admins only.
            require_role(access, writer_role(form.cleaned_data["kind"]))
            try:
                dataset = services.dataset_create(
                    actor=request.user, tenant=access.tenant, via=VIA, **form.cleaned_data
                )
            except DomainError as exc:
                form.add_error("name", exc.message)
            else:
                messages.success(request, f"Dataset '{dataset.name}' created.")
                return redirect(
                    "dataset-detail-page", tenant=access.tenant.slug, dataset_id=dataset.pk
                )
        status = 400

    filterset = DatasetFilter(
        request.GET or None, queryset=selectors.datasets_for_tenant(tenant=access.tenant)
    )
    page = paginate(request, filterset.qs, DATASETS_PER_PAGE)
    return render_tenant(
        request,
        access,
        "datasets/list.html",
        {
            "filter": filterset,
            "page": page,
            "form": form,
            "filtered": any(request.GET.get(f) for f in filterset.filters),
        },
        section=SECTION,
        status=status,
    )


def _detail(
    request: HttpRequest,
    access: TenantAccess,
    dataset: Dataset,
    *,
    upload_form: VersionUploadForm | None = None,
    upload_error: str = "",
    upload_error_line: int | None = None,
    status: int = 200,
) -> HttpResponse:
    versions = list(selectors.versions_of(dataset=dataset))
    ref = request.GET.get("v", "")
    if ref:
        selected = selectors.version_lookup(dataset=dataset, ref=ref)
        if selected is None:
            raise Http404("No such version.")
    else:
        selected = versions[0] if versions else None
    can_write = access.allows(writer_role(dataset.kind))
    if can_write and upload_form is None:
        upload_form = VersionUploadForm(task=dataset.task)
    return render_tenant(
        request,
        access,
        "datasets/detail.html",
        {
            "dataset": dataset,
            "versions": versions,
            "selected": selected,
            "chart": charts.label_chart(selected.labels) if selected is not None else None,
            "retrieval": dataset.task == Task.RETRIEVAL,
            "replies": dataset.task == Task.TEXT_GENERATION,
            "upload_form": upload_form if can_write else None,
            "upload_error": upload_error,
            "upload_error_line": upload_error_line,
            "can_write": can_write,
        },
        section=SECTION,
        status=status,
    )


@require_http_methods(["GET", "HEAD"])
@tenant_view
def dataset_detail(request: HttpRequest, access: TenantAccess, dataset_id: str) -> HttpResponse:
    return _detail(request, access, _dataset_or_404(access, dataset_id))


# The CSRF check runs inside, once the body is parsed: see ``csrf_rejection``.
@csrf_exempt
@require_POST
@tenant_view
def dataset_upload(request: HttpRequest, access: TenantAccess, dataset_id: str) -> HttpResponse:
    dataset = _dataset_or_404(access, dataset_id)
    # Checked before the body is read, so a refused upload is never written to disk.
    require_role(access, writer_role(dataset.kind))
    try:
        form = VersionUploadForm(request.POST, request.FILES, task=dataset.task)
    except UploadTooLarge as exc:
        # The handler stopped at the limit and removed its partial file; nothing to close.
        return _detail(
            request,
            access,
            dataset,
            upload_form=VersionUploadForm(task=dataset.task),
            upload_error=str(exc.detail),
            status=exc.status_code,
        )
    try:
        rejected = csrf_rejection(request)
        if rejected is not None:
            return rejected
        if not form.is_valid():
            return _detail(request, access, dataset, upload_form=form, status=400)
        upload = form.cleaned_data["file"]
        documents = form.cleaned_data.get("documents")
        for name, uploaded in (("file", upload), ("documents", documents)):
            if uploaded is not None and not isinstance(uploaded, HashedUploadedFile):
                # another upload handler is configured
                form.add_error(name, "The upload could not be read; try again.")
        if form.errors:
            return _detail(request, access, dataset, upload_form=form, status=400)
        try:
            result = services.dataset_version_create(
                actor=request.user,
                dataset=dataset,
                path=upload.path,
                sha256=upload.sha256,
                size_bytes=upload.size or 0,
                filename=upload.name or "",
                fmt=form.cleaned_data["format"],
                text_column=form.cleaned_data["text_column"],
                label_column=form.cleaned_data.get("label_column", "label"),
                context_column=form.cleaned_data.get("context_column"),
                first_nul=upload.first_nul,
                documents=services.UploadedFile(
                    path=documents.path,
                    sha256=documents.sha256,
                    size_bytes=documents.size or 0,
                    filename=documents.name or "",
                    first_nul=documents.first_nul,
                    fmt=form.cleaned_data["documents_format"],
                )
                if documents is not None
                else None,
                via=VIA,
            )
        except InvalidInput as exc:
            return _detail(
                request,
                access,
                dataset,
                upload_form=form,
                upload_error=exc.message,
                upload_error_line=exc.line,
                status=400,
            )
    finally:
        for name in request.FILES:
            for uploaded in request.FILES.getlist(name):
                uploaded.close()

    version = result.version
    if result.created and version.documents_sha256:
        messages.success(
            request,
            f"Version {version.number} stored: {version.rows:,} pairs, "
            f"{version.documents_count:,} documents.",
        )
    elif result.created and dataset.task == Task.TEXT_GENERATION:
        messages.success(
            request,
            f"Version {version.number} stored: {version.rows:,} replies, "
            f"{version.profile['with_context']:,} with context.",
        )
    elif result.created:
        messages.success(
            request,
            f"Version {version.number} stored: {version.rows:,} rows, "
            f"{version.label_count} labels.",
        )
    else:
        what = "These files are" if version.documents_sha256 else "This file is"
        messages.info(
            request, f"{what} identical to version {version.number}; nothing new was stored."
        )
    url = reverse(
        "dataset-detail-page", kwargs={"tenant": access.tenant.slug, "dataset_id": dataset.pk}
    )
    # "#main" scrolls back to the top, where the message is: without a fragment of its own
    # the redirect would inherit the form's "#upload".
    return redirect(f"{url}?v={version.number}#main")


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def dataset_delete(request: HttpRequest, access: TenantAccess, dataset_id: str) -> HttpResponse:
    dataset = _dataset_or_404(access, dataset_id)
    require_role(access, writer_role(dataset.kind))
    if request.method != "POST":
        return render_tenant(
            request, access, "datasets/delete_confirm.html", {"dataset": dataset}, section=SECTION
        )
    try:
        services.dataset_delete(actor=request.user, dataset=dataset, via=VIA)
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("dataset-detail-page", tenant=access.tenant.slug, dataset_id=dataset.pk)
    messages.success(request, f"Dataset '{dataset.name}' deleted.")
    return redirect("dataset-list-page", tenant=access.tenant.slug)
