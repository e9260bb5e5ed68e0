"""Tenant isolation: walk every API route with a foreign tenant's token.

Routes are enumerated from the URL conf, so a route added later is walked automatically:
a route under ``tenants/<tenant>/`` must answer 404 to an outsider for every method, and
a route outside it must be listed in ``GLOBAL_ROUTES`` with what an outsider may see.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from apps.datasets.models import Dataset, DatasetVersion
from apps.deployments.models import Deployment
from apps.evaluation.models import Evaluation, PromotionPolicy
from apps.notebooks.models import DataAccessRequest, NotebookServer
from apps.promotions.models import PromotionRequest
from apps.tenants.models import ApiToken, Membership
from apps.training.models import TrainingRun

pytestmark = pytest.mark.django_db

GOOD_CSV = b"text,label\nwhere is my card,card_arrival\nI lost my card,lost_card\n"
GLOBAL_ROUTES = {
    "api/v1/tenants/",
    "api/v1/base-models/",
    "api/v1/shared-datasets/",
    "api/v1/shared-datasets/<str:dataset_id>/versions/",
    "api/v1/tokens/",
    # Fleet-wide; another tenant's models are counted, never named (test_deployments_api).
    "api/v1/fleet/",
    "api/v1/tokens/<str:token_id>/",
    "api/v1/schema/",
    "api/v1/docs/",
}


def api_routes() -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []

    def walk(patterns: list[Any], prefix: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern):
                route = prefix + str(pattern.pattern)
                if route.startswith("api/v1/"):
                    found.append((route, pattern.callback))

    walk(get_resolver().url_patterns, "")
    return found


def allowed_methods(callback: Any) -> list[str]:
    view_class = callback.view_class
    return [m.upper() for m in ("get", "post", "put", "patch", "delete") if hasattr(view_class, m)]


@pytest.fixture
def victim_objects(admin, scientist, training_dataset, upload) -> dict[str, str]:
    from apps.datasets.models import DatasetVersion as Version
    from apps.registry.services import model_version_create
    from apps.training import services as training
    from tests.training_helpers import banking_slice

    response = upload(scientist, training_dataset, "a.csv", banking_slice())
    assert response.status_code == 201
    version = Version.objects.get(pk=response.json()["id"])
    token = ApiToken.objects.filter(user=admin.user).first()
    assert token is not None
    run = training.run_launch(actor=scientist.user, tenant=version.dataset.tenant,
                              dataset_version=version, base_model="tiny-bert",
                              params={"epochs": 1}, model_name="secret-model")  # fmt: skip
    model_version = model_version_create(
        run=run, artifact_key="models/x/model.tar", sha256="0" * 64, size_bytes=1,
        memory_bytes=1, predictions_key="models/x/p.jsonl", labels=["a"], metrics={},
    )  # fmt: skip
    sweep = training.sweep_launch(actor=scientist.user, tenant=version.dataset.tenant,
                                  dataset_version=version, base_model="tiny-bert",
                                  base_params={}, grid={"epochs": [1]}, metric="val_macro_f1",
                                  goal="max")  # fmt: skip
    evaluation = Evaluation.objects.create(
        tenant=version.dataset.tenant, model_version=model_version, dataset_version=version,
        artifact_sha256=model_version.sha256,
    )  # fmt: skip
    promotion = PromotionRequest.objects.create(
        tenant=version.dataset.tenant, model_version=model_version, target="staging",
        artifact_sha256=model_version.sha256, status="awaiting_approval",
    )  # fmt: skip
    deployment = Deployment.objects.create(
        tenant=version.dataset.tenant, model_version=model_version, environment="staging",
        artifact_sha256=model_version.sha256, status="warm",
    )  # fmt: skip
    access_request = DataAccessRequest.objects.create(
        tenant=version.dataset.tenant, dataset=version.dataset, requested_by=scientist.user,
        purpose="explore",
    )  # fmt: skip
    notebook = NotebookServer.objects.create(
        tenant=version.dataset.tenant, user=scientist.user, hub_user="sam", server_name="nb-x"
    )
    return {
        "deployment_id": deployment.pk,
        "notebook_id": notebook.pk,
        "request_id": access_request.pk,
        "version_id": version.pk,
        "promotion_id": promotion.pk,
        "evaluation_id": evaluation.pk,
        "model_kind": "classifier",
        "tenant": "acme",
        "dataset_id": training_dataset,
        "version": "1",
        "username": "ada",
        "token_id": token.pk,
        "run_id": run.pk,
        "sweep_id": sweep.pk,
        "name": model_version.registered_model.name,
        "number": str(model_version.number),
    }


def fill(route: str, values: dict[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        return values[match.group(2)]

    return "/" + re.sub(r"<(?:(\w+):)?(\w+)>", sub, route)


def snapshot() -> tuple[int, ...]:
    return (
        Dataset.objects.count(),
        DatasetVersion.objects.count(),
        Membership.objects.count(),
        ApiToken.objects.filter(revoked_at__isnull=True).count(),
        TrainingRun.objects.count(),
        TrainingRun.objects.filter(cancel_requested=True).count(),
        Evaluation.objects.count(),
        PromotionPolicy.objects.count(),
        PromotionRequest.objects.count(),
        PromotionRequest.objects.filter(status="awaiting_approval").count(),
        Deployment.objects.count(),
        Deployment.objects.filter(status="warm").count(),
        NotebookServer.objects.filter(status="starting").count(),
        DataAccessRequest.objects.filter(status="requested").count(),
    )


def test_every_tenant_route_is_404_for_an_outsider(victim_objects, outsider):
    routes = api_routes()
    tenant_routes = [(r, cb) for r, cb in routes if "<slug:tenant>" in r]
    assert len(tenant_routes) >= 8  # members, datasets, versions, download, audit, ...
    unclassified = [r for r, _ in routes if "<slug:tenant>" not in r and r not in GLOBAL_ROUTES]
    assert unclassified == [], f"new global routes need an isolation rule: {unclassified}"

    before = snapshot()
    checked = 0
    for route, callback in tenant_routes:
        path = fill(route, victim_objects)
        for method in allowed_methods(callback):
            response = outsider.api(
                method, path, {"name": "x", "kind": "training", "role": "admin", "username": "otto"}
            )
            assert response.status_code == 404, f"{method} {path} -> {response.status_code}"
            assert "acme" not in response.content.decode().replace("/acme/", "")
            checked += 1
    assert checked >= 12
    assert snapshot() == before  # nothing was changed by any refused request


def test_global_routes_show_an_outsider_nothing_of_other_tenants(victim_objects, outsider, admin):
    tenants = outsider.api("get", "/api/v1/tenants/").json()
    assert [t["slug"] for t in tenants["results"]] == ["globex"]
    assert (
        outsider.api("post", "/api/v1/tenants/", {"slug": "acme2", "name": "x"}).status_code == 403
    )
    tokens = outsider.api("get", "/api/v1/tokens/").json()
    assert victim_objects["token_id"] not in {t["id"] for t in tokens["results"]}
    token_path = f"/api/v1/tokens/{victim_objects['token_id']}/"
    assert outsider.api("get", token_path).status_code == 404
    assert outsider.api("delete", token_path).status_code == 404
    assert ApiToken.objects.get(pk=victim_objects["token_id"]).revoked_at is None
    # Shared golden sets are staff business: a tenant admin can neither list nor add to them.
    assert outsider.api("get", "/api/v1/shared-datasets/").status_code == 403
    assert outsider.api("post", "/api/v1/shared-datasets/", {"name": "x", "domain": "banking"}
                        ).status_code == 403  # fmt: skip
    catalogue = outsider.api("get", "/api/v1/base-models/").json()
    assert {m["id"] for m in catalogue} >= {"tiny-bert"}  # shared catalogue, no tenant data
    for path in ("/api/v1/schema/", "/api/v1/docs/"):
        assert outsider.client.get(path).status_code == 200
        assert victim_objects["dataset_id"] not in outsider.client.get(path).content.decode()


def test_filters_and_foreign_keys_do_not_leak(victim_objects, outsider):
    own = outsider.api("get", "/api/v1/tenants/globex/datasets/?q=support").json()
    assert own["count"] == 0
    audit = outsider.api(
        "get", f"/api/v1/tenants/globex/audit/?object_id={victim_objects['dataset_id']}"
    )
    assert audit.json()["count"] == 0
    # A token limited to a tenant the caller is not in: same answer as a tenant that does not exist.
    foreign = outsider.api("post", "/api/v1/tokens/", {"name": "x", "tenant": "acme"})
    unknown = outsider.api("post", "/api/v1/tokens/", {"name": "x", "tenant": "zzz"})
    assert foreign.status_code == unknown.status_code == 400


def test_unknown_and_foreign_tenant_answers_are_indistinguishable(victim_objects, outsider):
    foreign = outsider.api("get", "/api/v1/tenants/acme/datasets/")
    missing = outsider.api("get", "/api/v1/tenants/no-such-tenant/datasets/")
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == missing.json()
