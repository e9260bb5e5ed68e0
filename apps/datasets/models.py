from __future__ import annotations

from django.conf import settings
from django.db import models

from apps.core import ids
from apps.tenants.models import Role


class DatasetKind(models.TextChoices):
    TRAINING = "training", "Training"
    GOLDEN = "golden", "Golden (evaluation)"
    SAMPLE = "sample", "Sample"


# Golden and sample sets are the yardsticks a promotion's gates measure against: whoever
# could change them would choose their own gates, so only reviewers and admins write them.
YARDSTICK_KINDS = (DatasetKind.GOLDEN, DatasetKind.SAMPLE)


def writer_role(kind: str) -> Role:
    """The least role that may create, upload to, edit or delete a dataset of ``kind``."""
    return Role.REVIEWER if kind in YARDSTICK_KINDS else Role.SCIENTIST


class Task(models.TextChoices):
    TEXT_CLASSIFICATION = "text-classification", "Text classification"
    # Pairs (query, document id) with the knowledge base the ids point into.
    RETRIEVAL = "retrieval", "Retrieval"
    # Agent replies (``text``), each with the customer message it answers (``context``,
    # optional): what an autocomplete model learns to complete.
    TEXT_GENERATION = "text-generation", "Text generation"


def default_columns(task: str) -> tuple[str, str]:
    """The (text, label) columns a version's file is read by when the upload names none: a
    retrieval pairs file's text is its query and its label the id of the document; a reply
    corpus's "label" is the optional context column (see ``DatasetVersion``)."""
    if task == Task.RETRIEVAL:
        return ("query", "document_id")
    if task == Task.TEXT_GENERATION:
        return ("text", "context")
    return ("text", "label")


class Dataset(models.Model):
    """A named collection of immutable versions, owned by one tenant."""

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_dataset_id, editable=False
    )
    # No tenant: a shared golden set of a domain vertical, managed by staff, that every
    # tenant of that domain is evaluated on (and none can read).
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="datasets"
    )
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=DatasetKind.choices)
    task = models.CharField(max_length=32, choices=Task.choices, default=Task.TEXT_CLASSIFICATION)
    domain = models.CharField(max_length=50, blank=True, help_text="vertical, e.g. banking, retail")
    description = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"], name="dataset_name_unique_in_tenant"
            ),
            models.UniqueConstraint(
                fields=["name"],
                condition=models.Q(tenant__isnull=True),
                name="shared_dataset_name_unique",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class DatasetVersion(models.Model):
    """One uploaded file, frozen: its bytes live in the artifact store under ``storage_key``
    and never change; ``sha256`` is of exactly those bytes.

    A retrieval version is two files: the pairs (``storage_key``..., ``text_column`` names
    the query column and ``label_column`` the document-id column) and the knowledge base
    (``documents_*``: ids, texts, optional titles). A classification version's
    ``documents_*`` are empty. A version's content is the pair of hashes: the same pairs
    with another knowledge base is another version.

    A text-generation version is a reply corpus: ``text_column`` names the reply column and
    ``label_column`` the context column (the message each reply answers), or is ``""`` when
    the file has none; ``labels`` is empty and ``profile`` holds its figures. Worker code
    reads it with ``worker.reply_data``."""

    class Format(models.TextChoices):
        CSV = "csv", "CSV"
        JSONL = "jsonl", "JSON lines"

    id = models.CharField(
        primary_key=True, max_length=32, default=ids.new_dataset_version_id, editable=False
    )
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    storage_key = models.CharField(max_length=300, editable=False)
    format = models.CharField(max_length=8, choices=Format.choices)
    text_column = models.CharField(max_length=100)
    label_column = models.CharField(max_length=100)
    rows = models.PositiveIntegerField()
    labels = models.JSONField(help_text="label -> row count")
    duplicate_texts = models.PositiveIntegerField(help_text="rows whose text appeared earlier")
    preview = models.JSONField(help_text="the first rows, as {text, label}")
    original_filename = models.CharField(max_length=255, blank=True)
    documents_storage_key = models.CharField(max_length=300, blank=True, default="", editable=False)
    documents_format = models.CharField(
        max_length=8, choices=Format.choices, blank=True, default=""
    )
    documents_sha256 = models.CharField(max_length=64, blank=True, default="")
    documents_size_bytes = models.BigIntegerField(default=0)
    documents_original_filename = models.CharField(max_length=255, blank=True, default="")
    documents_count = models.PositiveIntegerField(default=0)
    documents_preview = models.JSONField(
        default=list, blank=True, help_text="the first documents, as {id, title, text}"
    )
    profile = models.JSONField(
        default=dict,
        blank=True,
        help_text="retrieval: {pairs, distinct_queries, documents, unreferenced_documents}; "
        "text-generation: {replies, words, vocabulary_size, longest_reply_words, with_context, "
        "mean_reply_words}",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["dataset", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "number"], name="version_number_unique"),
            # documents_sha256 is "" for classification: one version per file, as always.
            models.UniqueConstraint(
                fields=["dataset", "sha256", "documents_sha256"], name="version_content_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.dataset.name} v{self.number}"

    @property
    def label_count(self) -> int:
        return len(self.labels)
