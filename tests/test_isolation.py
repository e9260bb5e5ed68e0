"""Tenant isolation: walk every API route with a foreign tenant's token.

Routes are enumerated from the URL conf, so a route added later is walked automatically:
a route under ``tenants/<tenant>/`` must answer 404 to an outsider for every method, and
a route outside it must be listed in ``GLOBAL_ROUTES`` with what an outsider may see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest

from apps.batch.models import BatchPrediction
from apps.datasets.models import Dataset, DatasetVersion
from apps.deployments.models import Deployment
from apps.evaluation.models import Evaluation, PromotionPolicy
from apps.notebooks.models import DataAccessRequest, NotebookServer
from apps.promotions.models import PromotionRequest
from apps.tenants.models import ApiToken, Membership, Tenant
from apps.training.models import TrainingRun
from tests.routes import url_routes

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
    # Staff only (403 to anyone else): user accounts (test_onboarding).
    "api/v1/users/",
    "api/v1/users/<str:username>/",
    "api/v1/users/<str:username>/password-link",
    "api/v1/users/<str:username>/org-roles",
    # Staff only (403 to anyone else): campaigns across tenants (test_campaigns).
    "api/v1/campaigns/",
    "api/v1/campaigns/<str:campaign_id>/",
    "api/v1/campaigns/<str:campaign_id>/items/",
    "api/v1/campaigns/<str:campaign_id>/cancel",
    "api/v1/campaigns/<str:campaign_id>/approve",
    "api/v1/campaigns/<str:campaign_id>/reject",
    # Staff only: model health across tenants (test_model_health).
    "api/v1/model-health/",
    "api/v1/schema/",
    "api/v1/docs/",
}


def api_routes() -> list[tuple[str, Any]]:
    return url_routes("api/v1/")


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
    batch = BatchPrediction.objects.create(
        tenant=version.dataset.tenant, model_version=model_version, dataset_version=version,
        artifact_sha256=model_version.sha256, text_column="text",
    )  # fmt: skip
    return {
        "batch_id": batch.pk,
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
        "model_version_id": model_version.pk,
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
        BatchPrediction.objects.count(),
        BatchPrediction.objects.filter(cancel_requested=True).count(),
        BatchPrediction.objects.exclude(status="queued").count(),
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
    # User accounts are staff business too: a tenant admin sees, changes and creates none.
    for method, path in [("get", "/api/v1/users/"), ("get", "/api/v1/users/ada/"),
                         ("patch", "/api/v1/users/ada/"), ("post", "/api/v1/users/"),
                         ("post", "/api/v1/users/ada/password-link")]:  # fmt: skip
        assert outsider.api(method, path, {"is_active": False}).status_code == 403, path
    # Campaigns span tenants: staff business as well, whatever the id.
    for method, path in [("get", "/api/v1/campaigns/"), ("post", "/api/v1/campaigns/"),
                         ("get", "/api/v1/campaigns/cmp_x/"),
                         ("get", "/api/v1/campaigns/cmp_x/items/"),
                         ("post", "/api/v1/campaigns/cmp_x/cancel"),
                         ("post", "/api/v1/campaigns/cmp_x/approve"),
                         ("post", "/api/v1/campaigns/cmp_x/reject"),
                         ("get", "/api/v1/model-health/")]:  # fmt: skip
        assert outsider.api(method, path, {"promotions": "passing"}).status_code == 403, path
    assert admin.user.__class__.objects.get(pk=admin.user.pk).is_active
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


# --- ids inside request bodies -------------------------------------------------------------
#
# Every POST/PUT/PATCH of the OpenAPI schema, every string field of its request body: a
# field that takes an id (REFERENCES) is sent tenant B's id (acme's) by a member of tenant A
# (globex), and a random id of the same kind. Both must get the same answer, a 400/404 that
# names the field, and nothing may change. A field that is not an id is named in
# NOT_REFERENCES, so a new body field must be classified before the suite passes.

# field name -> the kind of id it takes (a key of victim_objects / own_objects)
REFERENCES = {
    "dataset": "dataset_id",
    "dataset_version": "version_id",
    "validation_version": "version_id",
    "dataset_versions": "version_id",
    "datasets": "version_id",  # notebooks: the dataset versions mounted
    "version": "version_id",  # data-access: a version number or id of the dataset
    "model_version": "model_version_id",
    "tenant": "tenant",  # tokens: limited to a tenant, by slug
}
# String fields that take no tenant object: free text, global names (users, the base-model
# catalogue), or values checked on their own (enums are skipped, having no ids).
NOT_REFERENCES = {
    "name", "description", "domain", "purpose", "comment", "model_name", "base_model",
    "username", "admins", "email", "password", "slug", "inputs", "label_column",
    "text_column", "query", "context_column", "prefix", "context",
    # A completion's session names a key/value cache of the one model it is sent to (a
    # tenant's own), so another tenant's session of the same name is another cache.
    "session",
    # Batch predictions: a model of the caller's tenant by name (looked up inside it, as
    # model_name is), and the name of the sample dataset an output becomes.
    "model", "dataset_name",
}  # fmt: skip
# Values a body needs to get past validation to the id fields; the rest are filled by type.
FILLERS: dict[str, Any] = {
    "base_model": "tiny-bert",
    "grid": {"epochs": [1]},
    "params": {"epochs": 1},
    "purpose": "probe the ids of other tenants",
    "name": "probe",
    "comment": "probe",
}
UNSAFE = ("post", "put", "patch")


def openapi_schema() -> dict[str, Any]:
    from drf_spectacular.generators import SchemaGenerator

    return SchemaGenerator().get_schema(request=None, public=True)  # type: ignore[no-any-return]


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    if "allOf" in node and len(node["allOf"]) == 1:
        return resolve(schema, node["allOf"][0])
    return node


def string_leaves(
    schema: dict[str, Any], node: dict[str, Any], path: str = ""
) -> list[tuple[str, bool]]:
    """``(path, is_a_list)`` of the free-form string fields of a request body; a path names
    nested fields like ``gates[].dataset``."""
    node = resolve(schema, node)
    found: list[tuple[str, bool]] = []
    for name, prop in node.get("properties", {}).items():
        prop = resolve(schema, prop)
        if prop.get("readOnly") or "enum" in prop or "oneOf" in prop:
            continue
        kind = prop.get("type")
        if kind == "string" and prop.get("format") not in ("binary", "date-time", "uri"):
            found.append((path + name, False))
        elif kind == "array":
            items = resolve(schema, prop.get("items", {}))
            if items.get("type") == "object":
                found += string_leaves(schema, items, f"{path}{name}[].")
            elif items.get("type") == "string" and "enum" not in items:
                found.append((path + name, True))
        elif kind == "object" and "properties" in prop:
            found += string_leaves(schema, prop, f"{path}{name}.")
    return found


def field_name(leaf: str) -> str:
    return leaf.rsplit(".", 1)[-1]


def sample(schema: dict[str, Any], node: dict[str, Any], name: str = "") -> Any:
    """A body that passes validation as far as it can without ids: required fields only."""
    node = resolve(schema, node)
    if name in FILLERS:
        return FILLERS[name]
    if "enum" in node:
        return node["enum"][0]
    if "oneOf" in node:
        return sample(schema, node["oneOf"][0], name)
    kind = node.get("type")
    if kind == "object" or "properties" in node:
        return {
            key: sample(schema, prop, key)
            for key, prop in node.get("properties", {}).items()
            if key in node.get("required", []) and not resolve(schema, prop).get("readOnly")
        }
    if kind == "array":
        item = resolve(schema, node.get("items", {}))
        return [sample(schema, item, name)] if item.get("type") == "object" else []
    return {"integer": 1, "number": 0.5, "boolean": False}.get(str(kind), "probe")


def with_value(body: dict[str, Any], leaf: str, value: Any, array: bool) -> dict[str, Any]:
    head, _, rest = leaf.partition(".")
    out = dict(body)
    if head.endswith("[]"):
        key = head[:-2]
        items = out.get(key) or [{}]
        out[key] = [with_value(items[0], rest, value, array)]
    elif rest:
        out[head] = with_value(out.get(head, {}), rest, value, array)
    else:
        out[head] = [value] if array else value
    return out


def random_like(value: str) -> str:
    from apps.core.ids import new_id

    prefix, sep, _ = value.partition("_")
    return new_id(prefix) if sep else "no-such-tenant"


@dataclass
class BodyProbe:
    method: str
    path: str
    leaf: str
    kind: str
    body: dict[str, Any]
    array: bool


def body_probes(schema: dict[str, Any], own: dict[str, str]) -> tuple[list[BodyProbe], list[str]]:
    """One probe per id field of every write's request body, and the fields not classified
    (nor a path parameter the caller's own objects cannot fill)."""
    probes: list[BodyProbe] = []
    unclassified: list[str] = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if method not in UNSAFE or "requestBody" not in operation:
                continue
            body_schema = next(iter(operation["requestBody"]["content"].values()))["schema"]
            leaves = string_leaves(schema, body_schema)
            where = f"{method.upper()} {path}"
            unclassified += [
                f"{where}: {leaf}"
                for leaf, _ in leaves
                if field_name(leaf) not in REFERENCES and field_name(leaf) not in NOT_REFERENCES
            ]
            references = [(leaf, array) for leaf, array in leaves if field_name(leaf) in REFERENCES]
            if not references:
                continue
            missing = [p for p in re.findall(r"{(\w+)}", path) if p not in own]
            if missing:
                unclassified.append(f"{where}: no own object for {missing}")
                continue
            filled = re.sub(r"{(\w+)}", lambda m: own[m.group(1)], path)
            # Every id field holds the caller's own object, but the one probed.
            base = sample(schema, body_schema)
            for leaf, array in references:
                base = with_value(base, leaf, own[REFERENCES[field_name(leaf)]], array)
            probes += [
                BodyProbe(method, filled, leaf, REFERENCES[field_name(leaf)], base, array)
                for leaf, array in references
            ]
    return probes, unclassified


@pytest.fixture
def own_objects(outsider, upload, victim_objects) -> dict[str, str]:
    """Tenant A's (globex's) objects of every kind a body references, the caller's own."""
    from apps.registry.services import model_version_create
    from apps.tenants.models import Tenant
    from apps.training import services as training
    from tests.training_helpers import banking_slice

    made = outsider.api(
        "post", "/api/v1/tenants/globex/datasets/", {"name": "own", "kind": "training"}
    )
    assert made.status_code == 201, made.content
    dataset_id = made.json()["id"]
    uploaded = upload(outsider, dataset_id, "own.csv", banking_slice(), tenant_slug="globex")
    assert uploaded.status_code == 201, uploaded.content
    version = DatasetVersion.objects.get(pk=uploaded.json()["id"])
    globex = Tenant.objects.get(slug="globex")
    run = training.run_launch(actor=outsider.user, tenant=globex, dataset_version=version,
                              base_model="tiny-bert", params={})  # fmt: skip
    model_version = model_version_create(
        run=run, artifact_key="models/y/model.tar", sha256="1" * 64, size_bytes=1,
        memory_bytes=1, predictions_key="models/y/p.jsonl", labels=["a"], metrics={},
    )  # fmt: skip
    from apps.deployments.models import Deployment

    deployment = Deployment.objects.create(
        tenant=globex, model_version=model_version, environment="production",
        artifact_sha256=model_version.sha256, status="warm",
    )  # fmt: skip
    return {
        "tenant": "globex",
        "dataset_id": dataset_id,
        "version_id": version.pk,
        "model_version_id": model_version.pk,
        "model_kind": "classifier",
        "deployment_id": deployment.pk,  # a reindex names a knowledge base
    }


def normalized(response: Any, value: str) -> tuple[int, str]:
    return response.status_code, response.content.decode().replace(value, "<id>")


def names_the_field(response: Any, leaf: str) -> bool:
    error = response.json()["error"]
    field = leaf.split(".")[0].removesuffix("[]")
    return field in error["fields"] or field.replace("_", " ") in error["message"].lower()


def test_ids_of_another_tenant_in_request_bodies_read_as_unknown_ids(
    victim_objects, own_objects, outsider, other_tenant, settings
):
    from apps.tenants import services as tenant_services
    from apps.tenants.models import Role
    from tests.conftest import free_port, make_actor

    # Notebook starts get past the hub check to their validation (the hub is down).
    settings.JUPYTERHUB_API_TOKEN = "unused"
    settings.JUPYTERHUB_URL = f"http://127.0.0.1:{free_port()}"
    # A member of both tenants may see B's objects, but may not use them in A.
    duo = make_actor("duo", other_tenant, Role.ADMIN)
    acme = Tenant.objects.get(slug="acme")
    tenant_services.membership_add(actor=None, tenant=acme, user=duo.user, role=Role.SCIENTIST)

    probes, unclassified = body_probes(openapi_schema(), own_objects)
    assert unclassified == [], f"request-body fields need an isolation rule: {unclassified}"
    probed = {(p.path.split("/globex/")[-1], p.leaf) for p in probes}
    for expected in (("runs/", "dataset_version"), ("runs/", "validation_version"),
                     ("sweeps/", "dataset_version"), ("evaluations/", "model_version"),
                     ("evaluations/", "dataset_versions"), ("promotions/", "model_version"),
                     ("notebooks/", "datasets"), ("data-access/", "dataset"),
                     ("policies/classifier/", "gates[].dataset")):  # fmt: skip
        assert expected in probed, expected

    before = snapshot()
    for actor in (outsider, duo):
        for probe in probes:
            if actor is duo and "/tenants/" not in probe.path:
                continue  # duo may limit a token to acme: it is theirs too
            foreign_id = victim_objects[probe.kind]
            unknown_id = random_like(foreign_id)
            where = f"{probe.method.upper()} {probe.path} {probe.leaf}"
            foreign = actor.api(
                probe.method,
                probe.path,
                with_value(probe.body, probe.leaf, foreign_id, probe.array),
            )
            unknown = actor.api(
                probe.method,
                probe.path,
                with_value(probe.body, probe.leaf, unknown_id, probe.array),
            )
            assert normalized(foreign, foreign_id) == normalized(unknown, unknown_id), where
            assert foreign.status_code in (400, 404), (where, foreign.content)
            assert names_the_field(foreign, probe.leaf), (where, foreign.content)
    assert snapshot() == before  # nothing was made from, or done to, tenant B's objects
