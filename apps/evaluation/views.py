"""Dashboard page for the tenant's promotion policies: every member reads them, admins edit
the classifier, embedding or autocomplete policy (``?kind=``; gates as rows, then the policy-wide
limits) through ``services.policy_update``, which audits the change."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from apps.core.errors import DomainError, InvalidInput
from apps.datasets.models import Dataset, DatasetKind
from apps.datasets.selectors import datasets_for_tenant, shared_datasets
from apps.evaluation import services
from apps.evaluation.forms import MAX_GATES, BaseGateFormSet, PolicyForm, gate_formset
from apps.evaluation.models import PromotionPolicy
from apps.registry.models import ModelKind
from apps.tenants.dashboard import VIA, render_tenant, require_role, tenant_view
from apps.tenants.models import Role
from apps.tenants.scoping import TenantAccess

SECTION = "policies-page"
EDITABLE_KIND = ModelKind.CLASSIFIER.value  # the form's kind when the page names none
EDITABLE_KINDS = (
    ModelKind.CLASSIFIER.value,
    ModelKind.EMBEDDING.value,
    ModelKind.AUTOCOMPLETE.value,
)


def _golden_datasets(access: TenantAccess, kind: str) -> list[Dataset]:
    """The golden sets a policy of ``kind`` may name: those of its models' task."""
    task = services.dataset_task(kind)
    own = list(datasets_for_tenant(tenant=access.tenant).filter(kind=DatasetKind.GOLDEN, task=task))
    shared: list[Dataset] = []
    if access.tenant.domain:
        shared = list(
            shared_datasets().filter(
                domain=access.tenant.domain, kind=DatasetKind.GOLDEN, task=task
            )
        )
    return own + shared


def _dataset_choices(datasets: list[Dataset], policy: PromotionPolicy) -> list[tuple[str, str]]:
    choices = [(d.pk, f"{d.name} (shared)" if d.tenant_id is None else d.name) for d in datasets]
    known = {pk for pk, _ in choices}
    for gate in policy.gates if isinstance(policy.gates, list) else []:
        ref = gate.get("dataset") if isinstance(gate, dict) else None
        if ref and ref not in known:  # a gate naming a dataset since deleted: keep it editable
            choices.append((str(ref), f"{ref} (not found)"))
            known.add(str(ref))
    return choices


def _gate_initial(policy: PromotionPolicy) -> list[dict[str, Any]]:
    gates = policy.gates if isinstance(policy.gates, list) else []
    return [
        {
            "metric": g.get("metric"),
            "op": g.get("op"),
            "value": g.get("value"),
            "dataset": g.get("dataset") or "",
        }
        for g in gates
        if isinstance(g, dict)
    ][:MAX_GATES]


def _policy_initial(policy: PromotionPolicy) -> dict[str, Any]:
    return {
        "max_regression_vs_champion": policy.max_regression_vs_champion,
        "latency_budget_ms": policy.latency_budget_ms,
        "require_staging_before_production": policy.require_staging_before_production,
        "trainer_may_approve": policy.trainer_may_approve,
    }


def _save(
    request: HttpRequest,
    access: TenantAccess,
    form: PolicyForm,
    formset: BaseGateFormSet,
    kind: str,
) -> bool:
    if not (form.is_valid() and formset.is_valid()):
        return False
    data = form.cleaned_data
    try:
        services.policy_update(
            actor=request.user,
            tenant=access.tenant,
            model_kind=kind,
            gates=formset.gates(),
            max_regression_vs_champion=data["max_regression_vs_champion"],
            latency_budget_ms=data["latency_budget_ms"],
            require_staging_before_production=data["require_staging_before_production"],
            trainer_may_approve=data["trainer_may_approve"],
            via=VIA,
        )
    except (InvalidInput, DomainError) as exc:
        form.add_error(None, exc.message)
        return False
    return True


@require_http_methods(["GET", "HEAD", "POST"])
@tenant_view
def policies_page(request: HttpRequest, access: TenantAccess) -> HttpResponse:
    can_edit = access.allows(Role.ADMIN)
    kind = request.GET.get("kind") or EDITABLE_KIND
    if kind not in EDITABLE_KINDS:
        kind = EDITABLE_KIND
    datasets = _golden_datasets(access, kind)
    names = {d.pk: d.name for k in EDITABLE_KINDS for d in _golden_datasets(access, k)}
    policies = [services.policy_for(tenant=access.tenant, model_kind=k) for k in ModelKind.values]
    editable = next(p for p in policies if p.model_kind == kind)
    choices = _dataset_choices(datasets, editable)
    status = 200
    form: PolicyForm | None = None
    formset: BaseGateFormSet | None = None
    if request.method == "POST":
        require_role(access, Role.ADMIN)
        form = PolicyForm(request.POST)
        formset = gate_formset(
            data=request.POST,
            initial=_gate_initial(editable),
            datasets=choices,
            metrics=services.gate_metrics(kind),
        )
        if _save(request, access, form, formset, kind):
            messages.success(request, f"The {kind} policy was saved.")
            target = reverse("policies-page", kwargs={"tenant": access.tenant.slug})
            return redirect(target if kind == EDITABLE_KIND else f"{target}?kind={kind}")
        status = 400
    elif can_edit:
        form = PolicyForm(initial=_policy_initial(editable))
        formset = gate_formset(
            initial=_gate_initial(editable), datasets=choices, metrics=services.gate_metrics(kind)
        )
    context = {
        "policies": [
            {
                "policy": p,
                "saved": p.pk is not None,
                "gates": [
                    {**g, "dataset_name": names.get(g.get("dataset") or "", g.get("dataset"))}
                    for g in (p.gates if isinstance(p.gates, list) else [])
                    if isinstance(g, dict)
                ],
            }
            for p in policies
        ],
        "can_edit": can_edit,
        "form": form,
        "formset": formset,
        "editable_kind": kind,
        "editable_kinds": EDITABLE_KINDS,
        "max_gates": MAX_GATES,
    }
    return render_tenant(
        request, access, "evaluation/policies.html", context, section=SECTION, status=status
    )
