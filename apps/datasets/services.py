"""Writes for datasets and their versions. Each is atomic and audited."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Max, ProtectedError, Q

from apps.audit.services import audit_record
from apps.core.artifacts import get_store
from apps.core.errors import DomainError, InvalidInput
from apps.datasets import ingest, reply_ingest, retrieval_ingest
from apps.datasets.models import Dataset, DatasetKind, DatasetVersion, Task
from apps.tenants.models import Tenant

log = logging.getLogger(__name__)


def _dataset_state(dataset: Dataset) -> dict[str, Any]:
    return {
        "name": dataset.name,
        "kind": dataset.kind,
        "task": dataset.task,
        "domain": dataset.domain,
        "description": dataset.description,
    }


@transaction.atomic
def dataset_create(
    *,
    actor: Any,
    tenant: Tenant | None,
    name: str,
    kind: str,
    task: str,
    domain: str = "",
    description: str = "",
    via: str = "",
) -> Dataset:
    if Dataset.objects.filter(tenant=tenant, name=name).exists():
        raise DomainError(f"A dataset named '{name}' already exists in this tenant.", code="exists")
    dataset = Dataset.objects.create(
        tenant=tenant,
        name=name,
        kind=kind,
        task=task,
        domain=domain,
        description=description,
        created_by=actor,
    )
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="dataset.create",
        obj=dataset,
        after=_dataset_state(dataset),
        via=via,
    )
    return dataset


@transaction.atomic
def dataset_update(
    *,
    actor: Any,
    dataset: Dataset,
    description: str | None = None,
    domain: str | None = None,
    via: str = "",
) -> Dataset:
    locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
    before = _dataset_state(locked)
    if description is not None:
        locked.description = description
    if domain is not None:
        locked.domain = domain
    locked.save(update_fields=["description", "domain"])
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="dataset.update",
        obj=locked,
        before=before,
        after=_dataset_state(locked),
        via=via,
    )
    return locked


def dataset_delete(*, actor: Any, dataset: Dataset, via: str = "") -> None:
    """Delete a dataset and its versions; refused (409) while anything references a version."""
    from apps.datasets.tasks import delete_artifacts

    with transaction.atomic():
        locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
        versions = list(
            locked.versions.values_list("number", "storage_key", "documents_storage_key")
        )
        before = {**_dataset_state(locked), "versions": [n for n, _, _ in versions]}
        try:
            locked.delete()
        except ProtectedError as exc:
            users = sorted({f"{o._meta.verbose_name} {o.pk}" for o in exc.protected_objects})
            raise DomainError(
                "This dataset cannot be deleted: its versions are used by "
                + ", ".join(users[:5])
                + (" and more" if len(users) > 5 else ""),
                code="in_use",
            ) from None
        audit_record(
            actor=actor,
            tenant=dataset.tenant,
            verb="dataset.delete",
            obj=dataset,
            object_id=dataset.pk,
            before=before,
            via=via,
        )
        # Versions may share a file (the same pairs with another knowledge base): once each.
        keys = sorted({key for _, *both in versions for key in both if key})
        # The bytes go only once the rows are gone for good, and on a worker: a refused or
        # rolled-back delete must leave every stored object in place.
        if keys:
            transaction.on_commit(lambda: delete_artifacts.delay(keys))


def discard_unreferenced(*, dataset: Dataset, key: str) -> bool:
    """Delete the stored object ``key`` of ``dataset`` unless a version references it; True
    if deleted. Under the dataset's row lock, which every upload holds while it stores bytes
    and records their version, so no version can come to reference them meanwhile."""
    try:
        with transaction.atomic():
            Dataset.objects.select_for_update().filter(pk=dataset.pk).first()
            if DatasetVersion.objects.filter(
                Q(storage_key=key) | Q(documents_storage_key=key)
            ).exists():
                log.info("upload cleanup kept bytes a version references", extra={"key": key})
                return False
            get_store().delete(key)
    except DatabaseError:
        # Unable to tell (the failure that led here broke the connection): an orphan object
        # costs some storage, deleting a version's bytes would lose data.
        log.warning("upload cleanup could not check references; kept", extra={"key": key})
        return False
    return True


@dataclass(frozen=True)
class UploadedFile:
    """A file on local disk, hashed on its way in (``apps.core.uploads``)."""

    path: Path
    sha256: str
    size_bytes: int
    filename: str
    first_nul: int | None = None
    fmt: str | None = None


@dataclass(frozen=True)
class VersionResult:
    version: DatasetVersion
    created: bool


def dataset_version_create(
    *,
    actor: Any,
    dataset: Dataset,
    path: Path,
    sha256: str,
    size_bytes: int,
    filename: str,
    fmt: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    context_column: str | None = None,
    first_nul: int | None = None,
    documents: UploadedFile | None = None,
    via: str = "",
) -> VersionResult:
    """Check an uploaded file, store its bytes, record it as the dataset's next version.

    A retrieval dataset's version is two files: ``path`` holds the pairs (``text_column``
    the query, ``label_column`` the document id) and ``documents`` the knowledge base they
    point into. A text-generation dataset's version is a reply corpus: ``text_column`` the
    replies, ``context_column`` the messages they answer (None: ``context`` when the file
    has it; recorded as the version's ``label_column``, "" without one). The same bytes
    uploaded again return the existing version (``created`` False). A file that fails any
    check raises ``InvalidInput`` before anything is stored or written.
    """
    retrieval = dataset.task == Task.RETRIEVAL
    replies = dataset.task == Task.TEXT_GENERATION
    if context_column is not None and not replies:
        message = (
            f"a {dataset.get_task_display().lower()} dataset has no context column: only "
            "text-generation versions (reply corpora) do"
        )
        raise InvalidInput(message, code="unexpected", fields={"context_column": [message]})
    if retrieval and documents is None:
        raise _documents_error(
            "a retrieval version needs its knowledge base: upload the documents file "
            "(columns id, text and optionally title) as 'documents' beside the pairs",
            code="required",
        )
    if not retrieval and documents is not None:
        raise _documents_error(
            f"a {dataset.get_task_display().lower()} dataset takes no documents file: "
            "only retrieval versions have a knowledge base",
            code="unexpected",
        )
    docs = None
    if documents is not None:
        docs = retrieval_ingest.profile_documents(
            documents.path,
            filename=documents.filename,
            fmt=documents.fmt,
            max_line_bytes=settings.DATASET_MAX_LINE_BYTES,
            first_nul=documents.first_nul,
        )
    summary: dict[str, Any] = {}
    if replies:
        corpus = reply_ingest.profile_replies(
            path,
            filename=filename,
            fmt=fmt,
            text_column=text_column,
            context_column=context_column,
            max_line_bytes=settings.DATASET_MAX_LINE_BYTES,
            first_nul=first_nul,
        )
        # A reply corpus has no labels: its "label" column is the context one.
        profile = ingest.Profile(
            format=corpus.format,
            text_column=corpus.text_column,
            label_column=corpus.context_column,
            columns=[],
            rows=corpus.rows,
            duplicate_texts=corpus.duplicate_texts,
            preview=corpus.preview,
        )
        summary = corpus.summary
    else:
        profile = ingest.profile_file(
            path,
            filename=filename,
            fmt=fmt,
            text_column=text_column,
            label_column=label_column,
            need_two_labels=dataset.kind == DatasetKind.TRAINING and not retrieval,
            max_line_bytes=settings.DATASET_MAX_LINE_BYTES,
            first_nul=first_nul,
            roles=retrieval_ingest.PAIR_ROLES if retrieval else ingest.CLASSIFICATION_ROLES,
        )
    if documents is not None and docs is not None:
        summary = retrieval_ingest.check_references(path, profile, docs)
        # A retrieval version's figures are its profile's; the document ids are no label
        # space (thousands of them, in every listing).
        profile.labels = {}
    content = {"sha256": sha256, "documents_sha256": documents.sha256 if documents else ""}
    existing = DatasetVersion.objects.filter(dataset=dataset, **content).first()
    if existing is not None:
        return VersionResult(existing, created=False)

    # The key is the content's: a concurrent retry of the same bytes writes the same key.
    # Bytes are written, and discarded after a failure, only under the dataset's row lock,
    # and discarded only when no version references them: a twin version committed by that
    # retry keeps its bytes whichever upload finishes first. (Uploads to one dataset wait
    # for each other while bytes are stored: the price of never losing them.)
    prefix = f"datasets/{dataset.tenant_id or 'shared'}/{dataset.pk}"
    key = f"{prefix}/{sha256}"
    documents_key = f"{prefix}/documents/{documents.sha256}" if documents else ""
    store = get_store()
    try:
        with transaction.atomic():
            # Lock the dataset so two uploads cannot take the same version number.
            Dataset.objects.select_for_update().get(pk=dataset.pk)
            twin = DatasetVersion.objects.filter(dataset=dataset, **content).first()
            if twin is not None:  # committed by a concurrent upload while this one waited
                return VersionResult(twin, created=False)
            store.put_file(key, path, move=True)
            if documents is not None:
                store.put_file(documents_key, documents.path, move=True)
            number = (dataset.versions.aggregate(n=Max("number"))["n"] or 0) + 1
            version = DatasetVersion.objects.create(
                dataset=dataset,
                number=number,
                sha256=sha256,
                size_bytes=size_bytes,
                storage_key=key,
                format=profile.format,
                text_column=profile.text_column,
                label_column=profile.label_column,
                rows=profile.rows,
                labels=profile.labels,
                duplicate_texts=profile.duplicate_texts,
                preview=profile.preview,
                original_filename=filename[:255],
                documents_storage_key=documents_key,
                documents_format=docs.format if docs else "",
                documents_sha256=content["documents_sha256"],
                documents_size_bytes=documents.size_bytes if documents else 0,
                documents_original_filename=documents.filename[:255] if documents else "",
                documents_count=docs.count if docs else 0,
                documents_preview=docs.preview if docs else [],
                profile=summary,
                created_by=actor,
            )
            audit_record(
                actor=actor,
                tenant=dataset.tenant,
                verb="dataset_version.create",
                obj=version,
                after={
                    "dataset": dataset.pk,
                    "number": number,
                    "sha256": sha256,
                    "rows": profile.rows,
                    "size_bytes": size_bytes,
                    **({"profile": summary} if replies else {}),
                    **(
                        {
                            "documents_sha256": documents.sha256,
                            "documents": summary["documents"],
                        }
                        if documents
                        else {}
                    ),
                },
                via=via,
            )
    except IntegrityError:
        # The same bytes won a race from another upload (a database without row locks):
        # same key, same bytes, theirs now.
        existing = DatasetVersion.objects.filter(dataset=dataset, **content).first()
        if existing is not None:
            return VersionResult(existing, created=False)
        _discard(dataset, key, documents_key)
        raise
    except BaseException:
        _discard(dataset, key, documents_key)
        raise
    log.info(
        "dataset version stored",
        extra={
            "dataset": dataset.pk,
            "version": version.pk,
            "rows": profile.rows,
            "bytes": size_bytes,
        },
    )
    return VersionResult(version, created=True)


def _discard(dataset: Dataset, *keys: str) -> None:
    for key in keys:
        if key:
            discard_unreferenced(dataset=dataset, key=key)


def _documents_error(message: str, *, code: str) -> InvalidInput:
    return InvalidInput(message, code=code, fields={retrieval_ingest.FIELD: [message]})
