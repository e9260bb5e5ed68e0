"""Writes for registered models and their versions."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from django.db import transaction
from django.db.models import Max

from apps.audit.services import audit_record
from apps.core.errors import DomainError
from apps.registry.models import ArtifactFormat, ModelKind, ModelVersion, RegisteredModel


def _run_kind(run: Any) -> str:
    """The registered model's kind: its run's base model's (a classifier, or embedding)."""
    from worker import base_models

    try:
        return ModelKind(base_models.get(run.base_model).kind).value
    except (base_models.UnknownBaseModel, ValueError):
        return ModelKind.CLASSIFIER.value


@transaction.atomic
def model_version_create(
    *,
    run: Any,
    artifact_key: str,
    sha256: str,
    size_bytes: int,
    memory_bytes: int,
    predictions_key: str,
    labels: list[str],
    metrics: dict[str, Any],
    mlflow_version: str = "",
    format: str = ArtifactFormat.FULL,
    base_sha256: str = "",
    base_memory_bytes: int = 0,
) -> ModelVersion:
    """Register the model a run produced. A run has at most one version (one-to-one).

    An adapter version names the shared base it needs (``base_sha256``) and that base's
    bytes; a full version has neither."""
    existing = ModelVersion.objects.filter(run=run).first()
    if existing is not None:
        return existing
    kind = _run_kind(run)
    model, _ = RegisteredModel.objects.get_or_create(
        tenant=run.tenant, name=run.model_name, defaults={"kind": kind}
    )
    if model.kind != kind:
        # The launch refuses it; a model registered in between lands here.
        raise DomainError(
            f"model '{model.name}' holds {model.kind} versions, not {kind}", code="kind_mismatch"
        )
    # Lock the model row: two runs finishing together must not take the same number.
    RegisteredModel.objects.select_for_update().get(pk=model.pk)
    number = (model.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = ModelVersion.objects.create(
        registered_model=model,
        number=number,
        run=run,
        artifact_key=artifact_key,
        sha256=sha256,
        size_bytes=size_bytes,
        memory_bytes=memory_bytes,
        predictions_key=predictions_key,
        labels=labels,
        metrics=metrics,
        mlflow_version=mlflow_version,
        format=format,
        base_sha256=base_sha256,
        base_memory_bytes=base_memory_bytes,
    )
    audit_record(
        actor=None,
        tenant=run.tenant,
        verb="model_version.create",
        obj=version,
        after={
            "model": model.name,
            "number": number,
            "sha256": sha256,
            "size_bytes": size_bytes,
            "format": format,
            "run": run.pk,
        },
        via="task",
    )
    return version


# A standalone model's layout as ``worker.adapters.export_merged`` writes it; a new layout
# takes new keys, so no cached export of an older one is handed out.
EXPORT_LAYOUT = "v1"


def export_key(version: ModelVersion) -> str:
    """Where a version's packed export is kept: from its artifact's sha256, which names its
    bytes (an adapter's names its base's sha256 too), so it is built once."""
    tenant_id = version.registered_model.tenant_id
    return f"exports/{tenant_id}/{EXPORT_LAYOUT}/{version.sha256}/model.tar"


def version_export(version: ModelVersion) -> tuple[str, str, int]:
    """(store key, sha256, size) of the version as a standalone merged model, packed.

    Built inline on the first request (a MiniLM merge takes about a second) and kept in the
    artifact store, so a second export is a plain download. Its sha256 and size sit beside
    it and are written last: a reader never finds one without a whole tar. Two requests
    racing both build it and write the same bytes (the tar is deterministic).
    """
    from apps.core.artifacts import download, get_store
    from apps.training.packaging import pack_dir, unpack

    store = get_store()
    key = export_key(version)
    meta_key = f"{key}.json"
    if store.exists(meta_key) and store.exists(key):
        with store.open(meta_key) as fh:
            meta = json.loads(fh.read())
        return key, str(meta["sha256"]), int(meta["size"])
    if not store.exists(version.artifact_key):
        raise DomainError(
            f"the version's artifact {version.artifact_key} is not in the store",
            code="artifact_missing",
        )
    with tempfile.TemporaryDirectory(prefix="workbench-export-") as tmp:
        work = Path(tmp)
        digest = download(version.artifact_key, work / "artifact.tar")
        if digest != version.sha256:
            raise DomainError(
                f"the stored artifact's sha256 is {digest}, not the version's {version.sha256}; "
                "refusing to export other bytes",
                code="artifact_mismatch",
            )
        model_dir = unpack(work / "artifact.tar", work / "model")
        _export_merged(model_dir, work / "export")
        sha256, size = pack_dir(work / "export", work / "export.tar")
        store.put_file(key, work / "export.tar", move=True)
        (work / "export.json").write_text(json.dumps({"sha256": sha256, "size": size}))
        store.put_file(meta_key, work / "export.json", move=True)
    return key, sha256, size


def _export_merged(model_dir: Path, target_dir: Path) -> None:
    """``export_merged``, its refusals as 409s: the base weights are not installed on this
    host, or the adapter was trained on other base weights than this host holds."""
    # Imported here: worker.adapters pulls in torch, which the web process loads only once
    # someone exports.
    from worker.adapters import AdapterError, export_merged
    from worker.base_models import BaseModelUnavailable

    try:
        export_merged(model_dir, target_dir)
    except BaseModelUnavailable as exc:
        raise DomainError(str(exc), code="base_unavailable") from None
    except AdapterError as exc:
        raise DomainError(str(exc), code="base_mismatch") from None
