"""The OpenAPI schema as automation and a fuzzer read it.

Two things drf-spectacular does not do by itself, done here for every view at once:

- every operation lists the error responses it can give, each with the error envelope
  ``{"error": {"code", "message", "fields"}}`` (``WorkbenchAutoSchema``, the API's
  ``DEFAULT_SCHEMA_CLASS``);
- the responses that hand out ids carry OpenAPI links to the operations that take them
  (``link_ids``, a post-processing hook), so a stateful client (schemathesis) can walk from
  ``POST runs/`` to ``runs/{run_id}/cancel`` instead of guessing ids.

A response code an operation cannot give is not listed: 413 only on uploads, 503 only where
a service outside the database answers (the serving fleet, JupyterHub), 409 only on writes.
"""

from __future__ import annotations

import re
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import force_instance
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import AllowAny, IsAuthenticated

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Writes that cannot conflict with an object's state (their services raise no DomainError):
# view class name -> methods. Any other write documents 409.
NO_CONFLICT: dict[str, frozenset[str]] = {
    "DatasetDetailApi": frozenset({"PATCH"}),
    "DatasetVersionListCreateApi": frozenset({"POST"}),
    "SharedDatasetVersionListCreateApi": frozenset({"POST"}),
    "RunListCreateApi": frozenset({"POST"}),
    "RunRerunApi": frozenset({"POST"}),
    "SweepListCreateApi": frozenset({"POST"}),
    "EvaluationListCreateApi": frozenset({"POST"}),
    "PolicyDetailApi": frozenset({"PUT"}),
    "TokenDetailApi": frozenset({"DELETE"}),
    "UserOrgRolesApi": frozenset({"PUT"}),
    "BatchListCreateApi": frozenset({"POST"}),
}
# Reads that answer 409 while the object is not in a state to have what they read.
CONFLICT_ON_READ: dict[str, frozenset[str]] = {
    "BatchOutputApi": frozenset({"GET"}),
}

# Operations that depend on a service outside the database and answer 503 while it does
# not: predicts, embeds, searches and completions (the serving fleet), starting and
# stopping notebook servers (JupyterHub).
UNAVAILABLE: dict[str, frozenset[str]] = {
    "ModelPredictApi": frozenset({"POST"}),
    "ModelEmbedApi": frozenset({"POST"}),
    "ModelSearchApi": frozenset({"POST"}),
    "ModelCompleteApi": frozenset({"POST"}),
    "NotebookListCreateApi": frozenset({"POST"}),
    "NotebookDetailApi": frozenset({"DELETE"}),
}

DESCRIPTIONS = {
    400: "Invalid input: `fields` says what is wrong with each field.",
    401: "No credentials, or a token that is unknown, expired or revoked.",
    403: "The object exists, but your role (or your token's limits) does not allow this.",
    404: "No such object (or it belongs to another tenant), or no such page.",
    409: "Not allowed in the object's current state (`code` says why).",
    413: "The upload is larger than the limit (DATASET_MAX_UPLOAD_BYTES).",
    415: "The request body's content type is not one this operation reads.",
    429: "Too many requests for this token: retry after `Retry-After` seconds.",
    503: "A service this depends on does not answer right now; nothing changed.",
}
RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer", "minimum": 0},
        "description": "Seconds to wait before trying again.",
    }
}


class ErrorDetailSerializer(serializers.Serializer[Any]):
    code = serializers.CharField(help_text="For programs: `not_found`, `invalid`, `not_warm`, …")
    message = serializers.CharField(help_text="For people.")
    # The envelope's key; DRF moves declared fields off the class, so no clash at run time.
    fields = serializers.DictField(  # type: ignore[assignment]
        help_text="Per input field, its problems (empty if none)."
    )
    status = serializers.CharField(
        required=False, help_text="On a 409: the object's current status, where it has one."
    )
    line = serializers.IntegerField(
        required=False, help_text="On an upload's 400: the first line with a problem."
    )


class ErrorSerializer(serializers.Serializer[Any]):
    """Every error the API answers, whatever its status."""

    error = ErrorDetailSerializer()


class WorkbenchAutoSchema(AutoSchema):
    def get_operation(
        self, path: str, path_regex: str, path_prefix: str, method: str, registry: Any
    ) -> dict[str, Any] | None:
        operation: dict[str, Any] | None = super().get_operation(
            path, path_regex, path_prefix, method, registry
        )
        if operation is None:
            return None
        responses: dict[str, Any] = operation["responses"]
        for status_code in self.error_statuses(operation):
            key = str(status_code)
            declared = responses.get(key, {})
            if "content" in declared:
                continue  # the view documents a body of its own
            error = self._get_response_for_code(  # type: ignore[no-untyped-call]
                ErrorSerializer, key, media_types=["application/json"]
            )
            error["description"] = declared.get("description") or DESCRIPTIONS[status_code]
            if status_code in (429, 503):
                error["headers"] = {**RETRY_AFTER, **error.get("headers", {})}
            responses[key] = error
        operation["responses"] = dict(sorted(responses.items()))
        return operation

    def _get_serializer_field_meta(self, field: Any, direction: str) -> dict[str, Any]:
        meta: dict[str, Any] = super()._get_serializer_field_meta(  # type: ignore[no-untyped-call]
            field, direction
        )
        if getattr(field, "read_only", False) and _source_nullable(field):
            # A read-only field declared by hand (``SlugRelatedField(read_only=True)`` on a
            # nullable foreign key) answers null where its model field does.
            meta["nullable"] = True
        return meta

    def error_statuses(self, operation: dict[str, Any]) -> list[int]:
        """The error statuses this operation can answer."""
        view, method = self.view, self.method
        name = type(view).__name__
        parameters = operation.get("parameters", [])
        in_path = [p for p in parameters if p.get("in") == "path"]
        in_query = {p["name"] for p in parameters if p.get("in") == "query"}
        body = operation.get("requestBody", {}).get("content", {})
        # 401 first: any request with a bad token is refused before the view runs.
        statuses = [401]
        if body or in_query - {"page", "page_size"}:
            statuses.append(400)  # a body, or filters, that do not validate
        if self._forbidden_possible():
            statuses.append(403)
        if in_path or "page" in in_query:
            statuses.append(404)  # an unknown id, another tenant's, or a page past the end
        conflicts = method in UNSAFE and method not in NO_CONFLICT.get(name, frozenset())
        if conflicts or method in CONFLICT_ON_READ.get(name, frozenset()):
            statuses.append(409)
        if body and self._takes_a_file():
            statuses.append(413)
        if body:
            statuses.append(415)
        if view.get_throttles():
            statuses.append(429)
        if method in UNAVAILABLE.get(name, frozenset()):
            statuses.append(503)
        return statuses

    def _takes_a_file(self) -> bool:
        serializer = self.get_request_serializer()
        instance = force_instance(serializer)  # type: ignore[no-untyped-call]
        fields = getattr(instance, "fields", {})
        return any(isinstance(f, serializers.FileField) for f in fields.values())

    def _forbidden_possible(self) -> bool:
        view = self.view
        if any(not isinstance(p, (AllowAny, IsAuthenticated)) for p in view.get_permissions()):
            return True  # staff only, notebook-token limits, ...
        if self.method in UNSAFE and any(
            isinstance(a, SessionAuthentication) for a in view.get_authenticators()
        ):
            return True  # a session without its CSRF token
        return getattr(view, "required_roles", None) is not None  # tenant roles


def _source_nullable(field: Any) -> bool:
    """Whether the model field a serializer field reads (through relations) may be null."""
    model = getattr(getattr(field.parent, "Meta", None), "model", None)
    source = getattr(field, "source", None) or ""
    if model is None or source == "*":
        return False
    for name in source.split("."):
        try:
            model_field = model._meta.get_field(name)
        except FieldDoesNotExist:
            return False  # a property or method: its serializer field says
        if model_field.null:
            return True
        model = model_field.related_model
        if model is None:
            return False
    return False


# --- links -------------------------------------------------------------------------------

HTTP_METHODS = ("get", "post", "put", "patch", "delete")
PATH_PARAMETER = re.compile(r"{([^}]+)}")
# Path parameters a client fixes once (its tenant), not ids it learns from responses.
FIXED_PARAMETERS = frozenset({"tenant"})
# Lists that hold the caller's own credentials or account: a link from them to a write
# would let a fuzzer revoke the very token it runs with. Writes there are linked from
# the operation that created the object only.
SELF_LISTS = ("/api/v1/tokens/", "/api/v1/users/")


def link_ids(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """Links from each operation that answers ids (creating one, or listing them) to every
    operation whose path takes such an id.

    ``.../things/{thing_id}/...`` takes the ids that ``POST .../things/`` and
    ``GET .../things/`` answer (the field named like the parameter, else ``id``); the
    other path parameters are passed on from the request.
    """
    paths: dict[str, dict[str, Any]] = result.get("paths", {})
    schemas: dict[str, Any] = result.get("components", {}).get("schemas", {})
    for path, item in paths.items():
        names = PATH_PARAMETER.findall(path)
        ids = [n for n in names if n not in FIXED_PARAMETERS]
        if not ids:
            continue
        taken = ids[-1]
        collection = path[: path.index("{" + taken + "}")]
        for method, target in item.items():
            if method not in HTTP_METHODS:
                continue
            for source_method in ("post", "get"):
                source = paths.get(collection, {}).get(source_method)
                if source is None or source is target:
                    continue
                if source_method == "get" and method != "get" and collection in SELF_LISTS:
                    continue
                for code, response in source.get("responses", {}).items():
                    if not code.startswith("2"):
                        continue
                    pointer = _id_pointer(response, taken, schemas)
                    if pointer is None:
                        continue
                    parameters = {
                        n: f"$response.body#{pointer}" if n == taken else f"$request.path.{n}"
                        for n in names
                    }
                    response.setdefault("links", {})[target["operationId"]] = {
                        "operationId": target["operationId"],
                        "parameters": parameters,
                        "description": f"The `{taken}` this response answers.",
                    }
    return result


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return _resolve(schemas[ref.rsplit("/", 1)[-1]], schemas) if ref else schema


def _id_pointer(response: dict[str, Any], parameter: str, schemas: dict[str, Any]) -> str | None:
    """The JSON pointer to the first id a response body answers for ``parameter``."""
    content = response.get("content", {}).get("application/json")
    if content is None or "schema" not in content:
        return None
    schema = _resolve(content["schema"], schemas)
    prefix = ""
    if schema.get("type") == "array":
        prefix, schema = "/0", _resolve(schema.get("items", {}), schemas)
    else:
        for name, prop in schema.get("properties", {}).items():
            # A page of objects (``results``), or objects under a name (``evaluations``).
            if prop.get("type") == "array" and "id" not in schema.get("properties", {}):
                prefix, schema = f"/{name}/0", _resolve(prop.get("items", {}), schemas)
                break
    properties = schema.get("properties", {})
    field = parameter if parameter in properties else "id" if "id" in properties else None
    return None if field is None else f"{prefix}/{field}"
