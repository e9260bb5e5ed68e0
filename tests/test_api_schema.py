"""The OpenAPI schema as a client or a fuzzer reads it (every operation's error responses,
links from the ids a response answers to the operations that take them), and the errors
under /api/ that Django answers itself: unknown paths and methods, OPTIONS.

tests/test_api_fuzz.py runs schemathesis against a live server on the same schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from apps.tenants.models import Role
from tests.conftest import Actor, make_actor
from tests.test_isolation import api_routes

pytestmark = pytest.mark.django_db

ERROR_REF = {"$ref": "#/components/schemas/Error"}
PATH_PARAMETER = re.compile(r"{([^}]+)}")
UPLOADS = {
    ("post", "/api/v1/tenants/{tenant}/datasets/{dataset_id}/versions/"),
    ("post", "/api/v1/shared-datasets/{dataset_id}/versions/"),
}
NEED_OTHER_SERVICES = {
    ("post", "/api/v1/tenants/{tenant}/models/{name}/predict"),
    ("post", "/api/v1/tenants/{tenant}/models/{name}/embed"),
    ("post", "/api/v1/tenants/{tenant}/models/{name}/search"),
    ("post", "/api/v1/tenants/{tenant}/models/{name}/complete"),
    ("post", "/api/v1/tenants/{tenant}/notebooks/"),
    ("delete", "/api/v1/tenants/{tenant}/notebooks/{notebook_id}/"),
}


def openapi(actor: Actor) -> dict[str, Any]:
    response = actor.client.get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    return dict(json.loads(response.content))


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield method, path, operation


def test_every_operation_documents_its_errors_in_the_envelope(admin):
    schema = openapi(admin)
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"code", "message", "fields"}
    for method, path, operation in operations(schema):
        where = f"{method.upper()} {path}"
        codes = operation["responses"]
        assert {"401", "429"} <= set(codes), where
        if "{" in path:
            assert "404" in codes, where  # unknown ids, other tenants' ids
        if "requestBody" in operation:
            assert {"400", "415"} <= set(codes), where
        for code, response in codes.items():
            if code >= "400":
                assert response["content"]["application/json"]["schema"] == ERROR_REF, (
                    where,
                    code,
                )
                assert response["description"], (where, code)


def test_a_status_an_operation_cannot_answer_is_not_listed(admin):
    by_code: dict[str, set[tuple[str, str]]] = {}
    for method, path, operation in operations(openapi(admin)):
        for code in operation["responses"]:
            by_code.setdefault(code, set()).add((method, path))
    assert by_code["413"] == UPLOADS
    assert by_code["503"] == NEED_OTHER_SERVICES
    # Two reads can conflict: an export is built (once) on this host, which may not hold
    # the base weights an adapter needs; a batch prediction has an output once it succeeded.
    export = ("get", "/api/v1/tenants/{tenant}/models/{name}/versions/{number}/export")
    output = ("get", "/api/v1/tenants/{tenant}/batch-predictions/{batch_id}/output")
    assert output in by_code["409"]
    reads = {export, output}
    assert {method for method, _ in by_code["409"] - reads} <= {"post", "put", "patch", "delete"}
    assert ("post", "/api/v1/tenants/{tenant}/promotions/{promotion_id}/approve") in by_code["409"]
    assert ("put", "/api/v1/tenants/{tenant}/policies/{model_kind}/") not in by_code["409"]
    # A list without filters (the base-model catalogue) has no input to refuse.
    assert ("get", "/api/v1/base-models/") not in by_code["400"]


def test_the_predict_503_says_when_to_retry(admin):
    schema = openapi(admin)
    predict = schema["paths"]["/api/v1/tenants/{tenant}/models/{name}/predict"]["post"]
    unavailable = predict["responses"]["503"]
    assert "Retry-After" in unavailable["headers"]
    assert "model_unavailable" in unavailable["description"]  # the view's own words stay


def test_every_operation_that_takes_an_id_is_linked_from_one_that_answers_it(admin):
    schema = openapi(admin)
    by_id = {op["operationId"]: (method, path) for method, path, op in operations(schema)}
    linked: set[str] = set()
    for _, source_path, operation in operations(schema):
        for code, response in operation["responses"].items():
            for link in response.get("links", {}).values():
                assert code.startswith("2")
                target_path = by_id[link["operationId"]][1]
                assert set(link["parameters"]) == set(PATH_PARAMETER.findall(target_path))
                for name, expression in link["parameters"].items():
                    # an id from the body, or a parameter the source itself was called with
                    assert expression.startswith("$response.body#/") or (
                        expression == f"$request.path.{name}" and f"{{{name}}}" in source_path
                    ), (source_path, target_path, name, expression)
                linked.add(link["operationId"])
    takes_ids = {
        op["operationId"]
        for _, path, op in operations(schema)
        if set(PATH_PARAMETER.findall(path)) - {"tenant"}
    }
    assert takes_ids, "no operation takes an id?"
    assert takes_ids - linked == set()


def test_a_run_created_over_rest_is_linked_to_its_cancel(admin):
    schema = openapi(admin)
    create = schema["paths"]["/api/v1/tenants/{tenant}/runs/"]["post"]["responses"]["202"]
    cancel = schema["paths"]["/api/v1/tenants/{tenant}/runs/{run_id}/cancel"]["post"]
    link = create["links"][cancel["operationId"]]
    assert link["parameters"] == {"tenant": "$request.path.tenant", "run_id": "$response.body#/id"}
    # Lists answer ids too: the first of the page.
    listed = schema["paths"]["/api/v1/tenants/{tenant}/runs/"]["get"]["responses"]["200"]
    assert listed["links"][cancel["operationId"]]["parameters"]["run_id"] == (
        "$response.body#/results/0/id"
    )


def test_no_link_from_the_token_list_revokes_the_callers_own_token(admin):
    schema = openapi(admin)
    listed = schema["paths"]["/api/v1/tokens/"]["get"]["responses"]["200"]
    revoke = schema["paths"]["/api/v1/tokens/{token_id}/"]["delete"]["operationId"]
    assert revoke not in listed.get("links", {})
    created = schema["paths"]["/api/v1/tokens/"]["post"]["responses"]["201"]
    assert created["links"][revoke]["parameters"]["token_id"] == "$response.body#/id"


# --- errors Django answers itself ---------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/api/v1/no-such-thing/", "/api/v1/tenants/acme/no-such-thing/", "/api/v1/runs"],
)
def test_an_unknown_api_path_is_a_404_in_the_error_envelope(admin, path):
    response = admin.client.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert path in error["message"]
    assert error["fields"] == {}


def test_pages_outside_the_api_keep_their_html_404(admin):
    admin.client.force_login(admin.user)
    response = admin.client.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_an_unknown_method_is_a_405_in_the_envelope_with_the_allowed_ones(admin):
    response = admin.client.generic("PURGE", "/api/v1/tenants/acme/runs/")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert {"GET", "POST"} <= {m.strip() for m in response["Allow"].split(",")}


def _concrete(route: str) -> str:
    route = re.sub(r"<slug:tenant>", "acme", route)
    route = re.sub(r"<int:[^>]+>", "1", route)
    return "/" + re.sub(r"<(?:str|slug):([^>]+)>", r"no-such-\1", route)


def test_options_answers_on_every_api_route(tenant):
    # Staff and the tenant's admin: every route lets this caller in.
    caller = make_actor("opal", tenant, Role.ADMIN, is_staff=True)
    for route, _ in api_routes():
        response = caller.api("options", _concrete(route))
        assert response.status_code in (200, 405), (route, response.status_code)


def test_options_shows_a_write_only_to_the_roles_that_may_make_it(admin, scientist):
    path = "/api/v1/tenants/acme/policies/classifier/"
    answered = admin.api("options", path)
    assert answered.status_code == 200
    assert "gates" in answered.json()["actions"]["PUT"]
    # Only admins may change a policy: a scientist is not offered the form.
    assert "actions" not in scientist.api("options", path).json()
    runs = scientist.api("options", "/api/v1/tenants/acme/runs/").json()
    assert "POST" in runs["actions"]


def test_the_schema_says_null_where_a_response_answers_null(admin):
    schemas = openapi(admin)["components"]["schemas"]
    # Read-only related fields declared by hand on nullable foreign keys.
    assert schemas["PromotionOutput"]["properties"]["decided_by"]["nullable"] is True
    assert schemas["TokenOutput"]["properties"]["tenant"]["nullable"] is True
    assert schemas["DeploymentOutput"]["properties"]["created_by"]["nullable"] is True
    assert "nullable" not in schemas["PromotionOutput"]["properties"]["model"]


def test_the_schema_describes_what_evaluation_requests_and_notebook_stops_answer(admin):
    schema = openapi(admin)
    paths = schema["paths"]
    requested = paths["/api/v1/tenants/{tenant}/evaluations/"]["post"]["responses"]["202"]
    ref = requested["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert schema["components"]["schemas"][ref]["properties"]["evaluations"]["type"] == "array"
    stopped = paths["/api/v1/tenants/{tenant}/notebooks/{notebook_id}/"]["delete"]["responses"]
    assert "200" in stopped and "204" not in stopped


def test_the_schema_describes_the_fleets_bases_and_each_models_format(admin):
    schemas = openapi(admin)["components"]["schemas"]
    replica = schemas["FleetReplica"]
    assert replica["properties"]["bases"]["items"] == {"$ref": "#/components/schemas/FleetBase"}
    assert {"bases", "models", "other_tenants_models"} <= set(replica["required"])
    assert set(schemas["FleetBase"]["required"]) == {
        "base_model", "name", "sha256", "memory_bytes", "adapters",
    }  # fmt: skip
    model = schemas["FleetModel"]
    assert {"format", "base_sha256"} <= set(model["required"])
    assert "hits" not in model["required"]  # backends differ in what they measure
