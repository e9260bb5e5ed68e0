"""What a notebook server's token may do: read granted data, launch and follow training
runs, read models, upload new dataset versions; nothing else.

The token lives in a notebook's environment, where any code the notebook runs can read
it. Limited to its tenant alone it could still download every dataset of the tenant
through the ordinary routes, so the approval of data access would mean nothing; this
permission (one of the API's defaults) closes those routes to it. Ordinary tokens pass
without a query: only a token named with the notebook prefix is looked at.
"""

from __future__ import annotations

from typing import Any

from rest_framework import permissions
from rest_framework.request import Request

from apps.tenants.models import ApiToken

READ = frozenset({"GET", "HEAD", "OPTIONS"})
# url name (namespace api) -> methods a notebook token may use there
NOTEBOOK_ROUTES: dict[str, frozenset[str]] = {
    "granted-data-list": READ,
    "granted-data-download": READ,
    "granted-data-documents-download": READ,
    "access-request-list": READ | {"POST"},
    "access-request-detail": READ,
    "run-list": READ | {"POST"},
    "run-detail": READ,
    "run-cancel": frozenset({"POST"}),
    "run-metrics": READ,
    "base-model-list": READ,
    "model-list": READ,
    "model-detail": READ,
    "model-version-list": READ,
    "model-version-detail": READ,
    # A version's standalone model (the client's export_version): the tenant's own model.
    "model-version-export": READ,
    "tenant-detail": READ,
    # Results a notebook uploads stay as new, immutable versions (of training data only).
    "dataset-version-list": frozenset({"POST", "OPTIONS"}),
}
RUN_DATA_FIELDS = ("dataset_version", "validation_version")


def is_notebook_token(auth: Any) -> bool:
    from apps.notebooks.services import NOTEBOOK_TOKEN_PREFIX

    return isinstance(auth, ApiToken) and auth.name.startswith(NOTEBOOK_TOKEN_PREFIX)


class NotebookTokenLimits(permissions.BasePermission):
    message = (
        "A notebook's token reaches granted data (granted-data/), training runs and models "
        "only; use the workbench client or a personal token for anything else."
    )

    def has_permission(self, request: Request, view: Any) -> bool:
        if not is_notebook_token(request.auth):
            return True
        match = request.resolver_match
        name = match.url_name if match is not None else None
        if request.method not in NOTEBOOK_ROUTES.get(name or "", frozenset()):
            return False
        if name == "run-list" and request.method == "POST":
            return self._run_data_granted(request)
        if name == "dataset-version-list" and request.method == "POST":
            return self._uploads_to_training_data(request, view)
        return True

    def _uploads_to_training_data(self, request: Request, view: Any) -> bool:
        # Golden sets decide promotions: a notebook may add results to training data only.
        from apps.datasets.models import Dataset, DatasetKind

        token = request.auth
        assert isinstance(token, ApiToken)
        # Only the token's own tenant is looked at: another tenant's ids stay unknown (404).
        kind = (
            Dataset.objects.filter(pk=view.kwargs.get("dataset_id"), tenant=token.tenant)
            .values_list("kind", flat=True)
            .first()
        )
        if kind is not None and kind != DatasetKind.TRAINING:
            self.message = (
                f"A notebook uploads results to training datasets only; this one is {kind}."
            )
            return False
        return True  # an unknown dataset: the view answers 404

    def _run_data_granted(self, request: Request) -> bool:
        from apps.notebooks.selectors import granted_versions

        token = request.auth
        assert isinstance(token, ApiToken)
        asked = [request.data.get(f) for f in RUN_DATA_FIELDS if isinstance(request.data, dict)]
        wanted = [str(v) for v in asked if v]
        if not wanted or token.tenant is None:
            return True  # the run's own validation names what is missing
        granted = set(
            granted_versions(tenant=token.tenant, user=request.user)
            .filter(pk__in=wanted)
            .values_list("pk", flat=True)
        )
        refused = [v for v in wanted if v not in granted]
        if refused:
            self.message = (
                f"Dataset version {refused[0]} is not granted to you: a notebook trains only on "
                "data a reviewer granted (request access with Workbench().request_access)."
            )
            return False
        return True
