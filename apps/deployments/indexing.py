"""Embedding deployments' indexes: which knowledge base, building, reindexing, switching.

An embedding deployment searches an index of a knowledge base: the dataset version named
by its ``corpus``, or else the training dataset version of its model version. The index is
built by the ``deployments.build_index`` task (:mod:`apps.deployments.tasks`, on the
training queue: it runs the model) with the version's own artifact, checked by sha256 on
the way in: every document through the document encoder, and the warm-up's reference (the
knowledge base's first distinct queries, their query embeddings and their top ids) beside
them, stored as one artifact (:mod:`worker.serving.embedding`) whose sha256 the deployment
keeps. A deployment is claimed by the fleet controller only once its index exists.

A reindex (:func:`deployment_reindex`) builds a *staged* index of another dataset version of
the tenant: the fleet loads it beside the served one, the controller verifies it with a
warm-up against its own reference, and only then makes it the index
(:func:`index_switch`); the served index answers every search until then, and a staged
index that fails leaves it serving (:func:`reindex_fail`). Blue/green, as for a model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.artifacts import get_store
from apps.core.errors import DomainError, InvalidInput
from apps.deployments import alerts
from apps.deployments.models import ACTIVE, SERVING, Deployment, DeploymentStatus
from apps.registry.models import ModelKind

log = logging.getLogger(__name__)

EMBEDDING = "embedding"


def is_embedding(deployment: Deployment) -> bool:
    return bool(deployment.model_version.registered_model.kind == EMBEDDING)


def knowledge_base(deployment: Deployment, *, staged: bool = False) -> Any:
    """The dataset version the (staged) index is built from."""
    if staged:
        return deployment.staged_dataset_version
    if deployment.corpus_id is not None:
        return deployment.corpus
    run = deployment.model_version.run
    return run.dataset_version


def _other_active(deployment: Deployment) -> Deployment | None:
    return (
        Deployment.objects.filter(model_version=deployment.model_version_id, status__in=ACTIVE)
        .exclude(pk=deployment.pk)
        .first()
    )


def shared_knowledge_base(version: Any) -> Any:
    """The knowledge base a new deployment of ``version`` must index: the fleet holds a
    version once, with one index, so where the version is deployed already (another
    environment) the new deployment searches what that one does — e.g. the knowledge base
    staging was reindexed to and verified with. None: the version's training data (or
    not an embedding model)."""
    if version.registered_model.kind != EMBEDDING:
        return None
    other = (
        Deployment.objects.filter(model_version=version, status__in=ACTIVE)
        .order_by("-created_at")
        .first()
    )
    if other is None:
        return None
    return other.index_dataset_version or knowledge_base(other)


def check_corpus(*, tenant: Any, dataset_version: Any) -> None:
    """A knowledge base a deployment of ``tenant`` may index: a retrieval dataset version
    of the tenant's own, with its documents. InvalidInput (400) otherwise."""
    from apps.datasets.models import Task

    dataset = dataset_version.dataset
    if dataset.tenant_id != tenant.pk:
        raise InvalidInput(
            "No such dataset version in this tenant.",
            code="unknown_dataset_version",
            fields={"dataset_version": ["not found"]},
        )
    if dataset.task != Task.RETRIEVAL or not dataset_version.documents_storage_key:
        raise InvalidInput(
            f"{dataset.name} v{dataset_version.number} is not a retrieval dataset version "
            "with a knowledge base; an index is built from one.",
            code="not_retrieval",
            fields={"dataset_version": ["not a retrieval dataset version"]},
        )


def index_request(deployment: Deployment, *, staged: bool = False) -> None:
    """Build the deployment's (staged) index, after this transaction commits."""
    transaction.on_commit(functools.partial(_send, deployment.pk, staged))


def _send(deployment_id: str, staged: bool) -> None:
    from apps.deployments.tasks import build_index

    build_index.apply_async((deployment_id, staged), queue=settings.TRAINING_QUEUE)


# --- building (the task's work; torch lives here only) -----------------------------------


def build(*, deployment_id: str, staged: bool) -> Deployment | None:
    """Build and store the (staged) index of the deployment, then record it; a failure is
    recorded (the deployment fails, or the reindex does) rather than raised."""
    deployment = (
        Deployment.objects.select_related(
            "model_version__registered_model",
            "model_version__run__dataset_version__dataset",
            "corpus__dataset",
            "staged_dataset_version__dataset",
            "tenant",
        )
        .filter(pk=deployment_id)
        .first()
    )
    if deployment is None:
        return None
    dataset_version = knowledge_base(deployment, staged=staged)
    try:
        if dataset_version is None or not dataset_version.documents_storage_key:
            raise ValueError("the knowledge base has no documents to index")
        data = _index_bytes(deployment, dataset_version)
    except Exception as error:  # recorded on the deployment, whatever went wrong
        log.exception("index build failed", extra={"deployment": deployment_id})
        reason = f"the index could not be built: {type(error).__name__}: {error}"
        if staged:
            return reindex_fail(deployment=deployment, reason=reason)
        return _index_failed(deployment, reason)
    sha256 = hashlib.sha256(data).hexdigest()
    key = f"indexes/{deployment.tenant.slug}/{deployment.pk}/{sha256}.npz"
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "index.npz"
        path.write_bytes(data)
        get_store().put_file(key, path)
    return index_built(
        deployment=deployment,
        staged=staged,
        key=key,
        sha256=sha256,
        size_bytes=len(data),
        documents=_count_documents(data),
        dataset_version=dataset_version,
    )


def _index_bytes(deployment: Deployment, dataset_version: Any) -> bytes:
    from worker.retrieval_data import read_documents, read_pairs
    from worker.serving.embedding import EmbeddingModel, build_index
    from worker.serving.loading import load_model
    from worker.training.config import DataSpec

    store = get_store()
    version = deployment.model_version
    # The approved bytes only: load_model checks the artifact's sha256.
    loaded = load_model(store.uri(version.artifact_key), deployment.artifact_sha256, device="cpu")
    model = loaded.classifier
    if not isinstance(model, EmbeddingModel):
        raise ValueError(f"{version} is not an embedding model")
    with tempfile.TemporaryDirectory() as scratch:
        documents_path = Path(scratch) / "documents"
        pairs_path = Path(scratch) / "pairs"
        for key, path in (
            (dataset_version.documents_storage_key, documents_path),
            (dataset_version.storage_key, pairs_path),
        ):
            with store.open(key) as source, path.open("wb") as target:
                while chunk := source.read(1024 * 1024):
                    target.write(chunk)
        documents = read_documents(documents_path, dataset_version.documents_format or "csv")
        pairs = read_pairs(
            DataSpec(
                path=pairs_path,
                text_column=dataset_version.text_column,
                label_column=dataset_version.label_column,
                format=dataset_version.format,
            )
        )
    queries = list(dict.fromkeys(p.query for p in pairs))[: settings.DEPLOYMENT_WARMUP_SAMPLES]
    return build_index(model.embedder, documents, queries=queries)


def _count_documents(data: bytes) -> int:
    from worker.serving.embedding import read_index

    return len(read_index(data, hashlib.sha256(data).hexdigest()).ids)


def index_built(
    *,
    deployment: Deployment,
    staged: bool,
    key: str,
    sha256: str,
    size_bytes: int,
    documents: int,
    dataset_version: Any,
) -> Deployment:
    """Record a built index: the deployment's (it can be claimed now), or the staged one of
    a reindex (the fleet loads it beside the served one). Nudges the controller."""
    from apps.deployments.services import fleet_nudge

    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        prefix = "staged_" if staged else ""
        if staged and locked.staged_dataset_version_id != dataset_version.pk:
            return locked  # the reindex was abandoned or replaced meanwhile
        fields = {
            f"{prefix}index_key": key,
            f"{prefix}index_sha256": sha256,
            f"{prefix}index_size_bytes": size_bytes,
            f"{prefix}index_documents": documents,
        }
        if not staged:
            fields["index_dataset_version"] = dataset_version
        for name, value in fields.items():
            setattr(locked, name, value)
        locked.index_error = ""
        locked.save(update_fields=[*fields, "index_error"])
        audit_record(
            actor=None,
            tenant=locked.tenant,
            verb="deployment.index_staged" if staged else "deployment.index_built",
            obj=locked,
            after={
                "dataset_version": dataset_version.pk,
                "index_sha256": sha256,
                "documents": documents,
            },
            via="task",
        )
        fleet_nudge()
    return locked


def _index_failed(deployment: Deployment, reason: str) -> Deployment:
    from apps.deployments.services import deployment_fail

    Deployment.objects.filter(pk=deployment.pk).update(index_error=reason[-4000:])
    if deployment.status in (DeploymentStatus.PENDING, DeploymentStatus.LOADING):
        return deployment_fail(deployment=deployment, reason=reason)
    return deployment


# A build not recorded this long after it was sent was lost (its task's hard time limit).
BUILD_LOST_AFTER_SECONDS = 3900


def watch_builds() -> list[str]:
    """The fleet controller's look at pending embedding deployments whose index never
    came (a lost task message, a worker killed mid-build): the build is sent again, up to
    DEPLOYMENT_LOAD_ATTEMPTS times, then the deployment fails naming why. Returns the
    deployments failed."""
    from datetime import timedelta

    from apps.deployments.services import deployment_fail

    now = timezone.now()
    stale = Deployment.objects.filter(
        status=DeploymentStatus.PENDING,
        model_version__registered_model__kind=EMBEDDING,
        index_sha256="",
        index_error="",
    ).select_related("model_version__registered_model", "tenant", "promotion")
    failed = []
    for deployment in stale:
        sent = deployment.claimed_at or deployment.created_at
        if now - sent < timedelta(seconds=BUILD_LOST_AFTER_SECONDS):
            continue
        attempts = max(1, deployment.load_attempts)
        if attempts >= settings.DEPLOYMENT_LOAD_ATTEMPTS:
            deployment_fail(
                deployment=deployment,
                reason=f"the index was not built after {attempts} attempts of "
                f"{BUILD_LOST_AFTER_SECONDS} s each",
            )
            failed.append(deployment.pk)
            continue
        Deployment.objects.filter(pk=deployment.pk, status=DeploymentStatus.PENDING).update(
            claimed_at=now, load_attempts=attempts + 1
        )
        log.warning("index build sent again", extra={"deployment": deployment.pk})
        _send(deployment.pk, False)
    # A reindex whose staged index never came is dropped (the served index serves on),
    # so that it does not block every later reindex of the deployment.
    lost_reindexes = Deployment.objects.filter(
        staged_dataset_version__isnull=False,
        staged_index_sha256="",
        staged_requested_at__lt=now - timedelta(seconds=BUILD_LOST_AFTER_SECONDS),
    )
    for deployment in lost_reindexes:
        reindex_fail(
            deployment=deployment,
            reason=f"the new index was not built within {BUILD_LOST_AFTER_SECONDS} s (its "
            "build was lost); the current index keeps serving — ask for the reindex again",
        )
    return failed


# --- reindexing --------------------------------------------------------------------------


@transaction.atomic
def deployment_reindex(
    *, actor: Any, deployment: Deployment, dataset_version: Any, via: str = ""
) -> Deployment:
    """Index another knowledge base into a warm embedding deployment without retraining:
    the staged index is built, loaded beside the served one, verified, then switched to."""
    locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if locked.model_version.registered_model.kind != ModelKind.EMBEDDING:
        raise DomainError(
            "Only an embedding model's deployment has an index to rebuild.",
            code="not_embedding",
            status=locked.status,
        )
    if locked.status not in SERVING:
        raise DomainError(
            f"This deployment is {locked.status}; only a warm deployment is reindexed.",
            code="not_warm",
            status=locked.status,
        )
    if locked.staged_dataset_version_id is not None:
        raise DomainError(
            "A reindex of this deployment is already in progress; wait for it to finish.",
            code="reindex_in_progress",
            status=locked.status,
        )
    other = _other_active(locked)
    if other is not None:
        raise DomainError(
            f"{locked.model_version} is also deployed to {other.environment} ({other.pk}): "
            "the fleet holds a version once, with one index, so both search the same "
            "knowledge base. Retire one of them first, or promote a new version.",
            code="index_shared",
            status=locked.status,
        )
    check_corpus(tenant=locked.tenant, dataset_version=dataset_version)
    locked.staged_dataset_version = dataset_version
    locked.staged_index_key = locked.staged_index_sha256 = ""
    locked.staged_index_size_bytes = locked.staged_index_documents = 0
    locked.staged_requested_at = timezone.now()
    locked.index_error = ""
    locked.save(
        update_fields=[
            "staged_requested_at",
            "staged_dataset_version",
            "staged_index_key",
            "staged_index_sha256",
            "staged_index_size_bytes",
            "staged_index_documents",
            "index_error",
        ]
    )
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="deployment.reindex",
        obj=locked,
        before={"dataset_version": locked.index_dataset_version_id},
        after={"dataset_version": dataset_version.pk},
        via=via,
    )
    index_request(locked, staged=True)
    return locked


@transaction.atomic
def index_switch(*, deployment: Deployment, warmup: Any) -> Deployment | None:
    """The staged index passed its warm-up: it becomes the index, the old one is let go
    (the controller's next apply drops it from the replicas)."""
    from apps.deployments.services import fleet_nudge

    locked = Deployment.objects.select_for_update().filter(pk=deployment.pk).first()
    if locked is None or not locked.staged_index_sha256 or not warmup.ok:
        return locked
    before = {
        "index_sha256": locked.index_sha256,
        "dataset_version": locked.index_dataset_version_id,
    }
    locked.index_key = locked.staged_index_key
    locked.index_sha256 = locked.staged_index_sha256
    locked.index_size_bytes = locked.staged_index_size_bytes
    locked.index_documents = locked.staged_index_documents
    locked.index_dataset_version_id = locked.staged_dataset_version_id
    locked.corpus_id = locked.staged_dataset_version_id
    _clear_staged(locked)
    locked.reindexed_at = timezone.now()
    locked.save()
    audit_record(
        actor=None,
        tenant=locked.tenant,
        verb="deployment.reindexed",
        obj=locked,
        before=before,
        after={
            "index_sha256": locked.index_sha256,
            "dataset_version": locked.index_dataset_version_id,
            "warmup": warmup.pk,
        },
        via="controller",
    )
    fleet_nudge()
    return locked


def reindex_fail(*, deployment: Deployment, reason: str) -> Deployment:
    """The staged index could not be built, loaded or verified: dropped; the served index
    keeps serving. Alerted like a failed warm-up."""
    from apps.deployments.services import fleet_nudge

    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        staged = locked.staged_dataset_version_id
        _clear_staged(locked)
        locked.index_error = reason[-4000:]
        locked.save()
        audit_record(
            actor=None,
            tenant=locked.tenant,
            verb="deployment.reindex_failed",
            obj=locked,
            after={"dataset_version": staged, "reason": reason[:1000]},
            via="controller",
        )
        alerts.alert_raise(
            tenant=locked.tenant,
            deployment=locked,
            kind="warmup_failed",
            message=f"Reindex of {locked.model_version} ({locked.environment}) failed; "
            f"the previous index keeps serving: {reason}",
        )
        fleet_nudge()
    return locked


def _clear_staged(deployment: Deployment) -> None:
    deployment.staged_dataset_version = None
    deployment.staged_index_key = deployment.staged_index_sha256 = ""
    deployment.staged_index_size_bytes = deployment.staged_index_documents = 0
    deployment.staged_requested_at = None


def index_of(key: str, sha256: str) -> Any:
    """An index artifact, checked by sha256, with the warm-up's reference (numpy only)."""
    from worker.serving.embedding import read_index

    with get_store().open(key) as fh:
        return read_index(fh.read(), sha256)
