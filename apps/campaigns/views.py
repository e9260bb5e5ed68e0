"""Campaign pages (staff): the list with the form that starts one, and a campaign's page —
its progress (live while it moves), its items with their gates, and batch decisions."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from apps.campaigns import services
from apps.campaigns.api import CampaignFilter, CampaignInputSerializer, ItemFilter
from apps.campaigns.forms import CampaignForm
from apps.campaigns.models import MOVING, Campaign, CampaignStatus
from apps.core.api import flatten_errors
from apps.core.errors import DomainError, InvalidInput
from apps.promotions.gates import champion_delta
from apps.tenants.models import OrgRole
from apps.tenants.views import org_view

OPERATOR = org_view(OrgRole.OPERATOR)
OPERATOR_OR_REVIEWER = org_view(OrgRole.OPERATOR, OrgRole.REVIEWER)

SECTION = "campaigns-page"
VIA = "dashboard"
ITEMS_PER_PAGE = 100
# Form fields the API's errors land on (the recipe's on the base model).
ERROR_FIELDS = {"recipe": "base_model"}


@require_http_methods(["GET", "HEAD", "POST"])
@OPERATOR
def campaigns_page(request: HttpRequest) -> HttpResponse:
    form = CampaignForm()
    status = 200
    if request.method == "POST":
        form = CampaignForm(request.POST)
        if form.is_valid():
            data = CampaignInputSerializer(data=form.api_payload())
            if data.is_valid():
                campaign = services.campaign_create(
                    actor=request.user, via=VIA, **data.validated_data
                )
                messages.success(request, f"Campaign '{campaign.name}' started.")
                return redirect("campaign-page", campaign_id=campaign.pk)
            for name, errors in data.errors.items():
                field = ERROR_FIELDS.get(name, name)
                text = " ".join(flatten_errors(errors))
                form.add_error(field if field in form.fields else None, text)
        status = 400
    filterset = CampaignFilter(request.GET or None, queryset=Campaign.objects.all())
    page = Paginator(filterset.qs.select_related("created_by"), 50).get_page(
        request.GET.get("page")
    )
    rows = [(c, services.campaign_progress(c)) for c in page]
    context = {
        "form": form,
        "filter": filterset,
        "page": page,
        "rows": rows,
        "nav_section": SECTION,
    }
    return render(request, "campaigns/list.html", context, status=status)


def _campaign_or_404(campaign_id: str) -> Campaign:
    campaign = Campaign.objects.select_related("created_by").filter(pk=campaign_id).first()
    if campaign is None:
        raise Http404("No such campaign.")
    return campaign


@require_http_methods(["GET", "HEAD"])
@OPERATOR_OR_REVIEWER
def campaign_page(request: HttpRequest, campaign_id: str) -> HttpResponse:
    campaign = _campaign_or_404(campaign_id)
    progress = services.campaign_progress(campaign)
    moving = sum(progress.counts.get(s, 0) for s in MOVING)
    live = campaign.status == CampaignStatus.ACTIVE or moving > 0
    context: dict[str, Any] = {
        "campaign": campaign,
        "progress": progress,
        "bars": _bars(progress),
        "live": live,
        "nav_section": SECTION,
    }
    if request.GET.get("partial") == "progress":
        return render(request, "campaigns/_progress.html", context)
    filterset = ItemFilter(request.GET or None, queryset=services.items_of(campaign))
    items = filterset.qs.order_by("tenant__slug", "created_at")
    page = Paginator(items, ITEMS_PER_PAGE).get_page(request.GET.get("page"))
    rows = [
        {
            "item": item,
            "promotion": item.promotion,
            "regressed": item.promotion is not None and services.regressed(item.promotion),
            "gates": [_with_delta(r) for r in (item.promotion.gate_results if item.promotion
                                               else [])],
        }
        for item in page
    ]  # fmt: skip
    context.update(
        {
            "filter": filterset,
            "page": page,
            "rows": rows,
            "awaiting": services.awaiting(campaign).count(),
        }
    )
    return render(request, "campaigns/detail.html", context)


def _with_delta(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "delta": champion_delta(row)}


# The order the progress bar shows statuses in, with a colour class each.
BAR_ORDER = [
    ("done", "ok"), ("approved", "ok"), ("deploying", "ok"), ("awaiting_approval", "info"),
    ("checking", "info"), ("training", "info"), ("pending", "muted"), ("skipped", "warn"),
    ("rejected", "warn"), ("failed", "bad"), ("cancelled", "muted"),
]  # fmt: skip


BAR_WIDTH = 1000  # the stacked bar's viewBox width; each status a share of it


def _bars(progress: services.Progress) -> list[dict[str, Any]]:
    total = progress.total or 1
    bars, x = [], 0.0
    for status, tone in BAR_ORDER:
        n = progress.counts.get(status)
        if not n:
            continue
        width = BAR_WIDTH * n / total
        bars.append({"status": status, "tone": tone, "n": n, "x": round(x, 1),
                     "width": round(width, 1), "text_x": round(x + width / 2, 1),
                     "percent": round(100 * n / total, 1)})  # fmt: skip
        x += width
    return bars


@require_POST
@OPERATOR
def campaign_cancel(request: HttpRequest, campaign_id: str) -> HttpResponse:
    campaign = _campaign_or_404(campaign_id)
    try:
        services.campaign_cancel(actor=request.user, campaign=campaign, via=VIA)
    except DomainError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"Campaign '{campaign.name}' cancelled.")
    return redirect("campaign-page", campaign_id=campaign.pk)


@require_POST
@OPERATOR_OR_REVIEWER
def campaign_decide(request: HttpRequest, campaign_id: str) -> HttpResponse:
    """The batch form: approve or reject the ticked requests, or every passing one."""
    campaign = _campaign_or_404(campaign_id)
    approve = request.POST.get("decision") != "reject"
    selected: list[str] | str = (
        "passing" if request.POST.get("which") == "passing" else request.POST.getlist("promotion")
    )
    if not selected:
        messages.error(request, "Tick the requests to decide, or choose every passing one.")
        return redirect("campaign-page", campaign_id=campaign.pk)
    try:
        result = services.campaign_decide(
            actor=request.user,
            campaign=campaign,
            promotions=selected,
            approve=approve,
            comment=request.POST.get("comment", "")[:5000],
            via=VIA,
        )
    except InvalidInput as error:
        messages.error(request, error.message)
        return redirect("campaign-page", campaign_id=campaign.pk)
    verb = "Approved" if approve else "Rejected"
    if result.decided:
        tenants = ", ".join(d["tenant"] for d in result.decided)
        messages.success(request, f"{verb} {len(result.decided)}: {tenants}.")
    for failure in result.failed:
        messages.error(request, f"{failure['tenant']}: {failure['message']}")
    if not result.decided and not result.failed:
        messages.info(request, "No request was awaiting a decision.")
    return redirect("campaign-page", campaign_id=campaign.pk)
