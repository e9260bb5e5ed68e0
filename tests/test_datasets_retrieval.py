"""Retrieval datasets: a version is its pairs and the knowledge base they point into.

Uploads go through the real upload handler, services and artifact store (REST, dashboard
and the notebook client); the data is a slice of StackFAQ, read from ../shared.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from apps.audit.models import AuditEvent
from apps.datasets.models import Dataset, DatasetVersion
from tests.conftest import Actor, stored_files

pytestmark = pytest.mark.django_db

STACKFAQ = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "stackfaq"
DATASETS = "/api/v1/tenants/acme/datasets/"
DOCS_CSV = b"id,title,text\nd1,Cards,Where is my card\nd2,,Lost cards are blocked\nd3,Fees,None\n"
PAIRS_CSV = b"query,document_id\nwhen does my card come,d1\nI lost it,d2\nmy card?,d1\n"


def _csv_bytes(header: list[str], rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


@pytest.fixture(scope="module")
def stackfaq_slice() -> dict[str, Any]:
    """The first 30 StackFAQ documents, and the train pairs that point into them."""
    with (STACKFAQ / "documents.csv").open(newline="", encoding="utf-8") as fh:
        documents = list(csv.DictReader(fh))[:30]
    ids = {d["id"] for d in documents}
    with (STACKFAQ / "train.csv").open(newline="", encoding="utf-8") as fh:
        pairs = [p for p in csv.DictReader(fh) if p["document_id"] in ids]
    return {
        "documents": documents,
        "pairs": pairs,
        "documents_csv": _csv_bytes(["id", "title", "text"], documents),
        "pairs_csv": _csv_bytes(["query", "document_id"], pairs),
    }


def create(actor: Actor, name: str = "help-center", kind: str = "training", **extra: Any) -> str:
    response = actor.api(
        "post", DATASETS, {"name": name, "kind": kind, "task": "retrieval", **extra}
    )
    assert response.status_code == 201, response.content
    assert response.json()["task"] == "retrieval"
    return str(response.json()["id"])


def post(
    actor: Actor,
    dataset_id: str,
    pairs: bytes,
    documents: bytes | None,
    *,
    pairs_name: str = "pairs.csv",
    documents_name: str = "documents.csv",
    **fields: Any,
) -> Any:
    data: dict[str, Any] = {"file": SimpleUploadedFile(pairs_name, pairs), **fields}
    if documents is not None:
        data["documents"] = SimpleUploadedFile(documents_name, documents)
    return actor.client.post(f"{DATASETS}{dataset_id}/versions/", data)


def grant(scientist: Actor, reviewer: Actor, dataset_id: str) -> None:
    asked = scientist.api(
        "post",
        "/api/v1/tenants/acme/data-access/",
        {"dataset": dataset_id, "purpose": "tune a retriever"},
    )
    assert asked.status_code == 201, asked.content
    decided = f"/api/v1/tenants/acme/data-access/{asked.json()['id']}/grant"
    assert reviewer.api("post", decided, {}).status_code == 200


def assert_nothing_stored(artifacts_dir: Path, settings: Any, events_before: int) -> None:
    assert not DatasetVersion.objects.exists()
    assert stored_files(artifacts_dir) == []
    assert AuditEvent.objects.count() == events_before
    assert list(Path(settings.UPLOAD_TMP_DIR).glob("upload-*")) == []


# --- a StackFAQ slice, through the REST API --------------------------------------------


def test_a_stackfaq_slice_is_stored_with_its_profile(
    scientist, tenant, artifacts_dir, stackfaq_slice
):
    dataset = create(scientist)
    data = stackfaq_slice
    response = post(scientist, dataset, data["pairs_csv"], data["documents_csv"])
    assert response.status_code == 201, response.content
    version = response.json()
    pairs, documents = data["pairs"], data["documents"]
    referenced = {p["document_id"] for p in pairs}
    assert version["profile"] == {
        "pairs": len(pairs),
        "distinct_queries": len({p["query"] for p in pairs}),
        "documents": 30,
        "unreferenced_documents": len({d["id"] for d in documents} - referenced),
    }
    assert (version["text_column"], version["label_column"]) == ("query", "document_id")
    assert version["rows"] == len(pairs) and version["labels"] == {}
    assert version["documents_count"] == 30 and version["documents_format"] == "csv"
    assert version["documents_sha256"] == hashlib.sha256(data["documents_csv"]).hexdigest()
    assert version["documents_size_bytes"] == len(data["documents_csv"])
    assert version["documents_original_filename"] == "documents.csv"
    assert version["documents_preview"][0] == {
        "id": documents[0]["id"],
        "title": documents[0]["title"],
        "text": documents[0]["text"],
    }
    assert version["preview"][0] == {"text": pairs[0]["query"], "label": pairs[0]["document_id"]}
    assert "documents_storage_key" not in version
    # Both files, byte for byte, in the store; each downloadable with its sha256.
    stored = {hashlib.sha256(p.read_bytes()).hexdigest() for p in stored_files(artifacts_dir)}
    assert stored == {version["sha256"], version["documents_sha256"]}
    url = f"{DATASETS}{dataset}/versions/1/"
    files = {"download": data["pairs_csv"], "documents/download": data["documents_csv"]}
    for route, content in files.items():
        got = scientist.client.get(f"{url}{route}")
        assert got.status_code == 200
        assert b"".join(got.streaming_content) == content
        assert got["X-Content-SHA256"] == hashlib.sha256(content).hexdigest()
    event = AuditEvent.objects.get(verb="dataset_version.create")
    assert event.after is not None and event.after["documents"] == 30


def test_same_pairs_and_documents_are_the_same_version_another_knowledge_base_a_new_one(
    scientist, tenant, artifacts_dir
):
    dataset = create(scientist)
    first = post(scientist, dataset, PAIRS_CSV, DOCS_CSV)
    assert first.status_code == 201
    again = post(scientist, dataset, PAIRS_CSV, DOCS_CSV)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    grown = post(scientist, dataset, PAIRS_CSV, DOCS_CSV + b"d4,New,A new article\n")
    assert grown.status_code == 201, grown.content
    assert grown.json()["number"] == 2 and grown.json()["sha256"] == first.json()["sha256"]
    assert grown.json()["profile"]["unreferenced_documents"] == 2
    assert len(stored_files(artifacts_dir)) == 3  # the pairs file is stored once


def test_jsonl_files_with_mapped_columns_and_integer_ids(scientist, tenant, artifacts_dir):
    dataset = create(scientist)
    documents = (
        b'{"id": 1, "text": "Reset it from the login page"}\n\n{"id": 2, "text": "Ask us"}\n'
    )
    pairs = b'{"q": "forgot my password", "doc": 1}\n{"q": "help", "doc": "2"}\n'
    unknown = post(
        scientist, dataset, pairs + b'\n{"q": "fees?", "doc": 3}\n', documents,
        pairs_name="p.jsonl", documents_name="kb.jsonl", text_column="q", label_column="doc",
    )  # fmt: skip
    assert unknown.status_code == 400
    assert unknown.json()["error"]["line"] == 4 and "'3'" in unknown.json()["error"]["message"]
    twice = post(
        scientist, dataset, pairs, documents + b'{"id": "1", "text": "again"}\n',
        pairs_name="p.jsonl", documents_name="kb.jsonl", text_column="q", label_column="doc",
    )  # fmt: skip
    assert twice.status_code == 400 and twice.json()["error"]["line"] == 4
    response = post(
        scientist, dataset, pairs, documents, pairs_name="p.jsonl", documents_name="kb.jsonl",
        text_column="q", label_column="doc",
    )  # fmt: skip
    assert response.status_code == 201, response.content
    version = response.json()
    assert version["documents_format"] == "jsonl" and version["format"] == "jsonl"
    assert version["documents_preview"][1] == {"id": "2", "title": "", "text": "Ask us"}
    assert version["profile"]["unreferenced_documents"] == 0


# --- refusals: 400 naming the problem, nothing stored -------------------------------------

REFUSALS = [
    (
        "unknown document id",
        PAIRS_CSV + b"what fees,d9\n",
        DOCS_CSV,
        "unknown_document",
        5,
        "file",
        "'d9'",
    ),
    # Ids match as written, as training and evaluation read them.
    (
        "document id with a space",
        b"query,document_id\nhello,d1\nbye, d2\n",
        DOCS_CSV,
        "unknown_document",
        3,
        "file",
        "' d2'",
    ),
    (
        "duplicate document id",
        PAIRS_CSV,
        DOCS_CSV + b"d2,Again,Another text\n",
        "duplicate_id",
        5,
        "documents",
        "'d2' appears twice (first on line 3)",
    ),
    ("no documents file", PAIRS_CSV, None, "required", None, "documents", "knowledge base"),
    (
        "empty document text",
        PAIRS_CSV,
        b"id,text\nd1,  \nd2,x\n",
        "empty_text",
        2,
        "documents",
        "'d1'",
    ),
    ("no text column", PAIRS_CSV, b"id,body\nd1,x\n", "missing_column", 1, "documents", "'text'"),
    (
        "latin-1 documents",
        PAIRS_CSV,
        "id,text\nd1,caf\xe9\n".encode("latin-1"),
        "encoding",
        2,
        "documents",
        "UTF-8",
    ),
    ("binary documents", PAIRS_CSV, b"id,text\nd1,\x00\x01\n", "binary", 2, "documents", "NUL"),
    (
        "long document line",
        PAIRS_CSV,
        b"id,text\nd1," + b"x" * 70_000 + b"\n",
        "line_too_long",
        2,
        "documents",
        "longer",
    ),
    ("empty documents file", PAIRS_CSV, b"", "empty", None, "documents", "empty"),
    (
        "empty query",
        b"query,document_id\nhello,d1\n  ,d2\n",
        DOCS_CSV,
        "empty_text",
        3,
        "file",
        "query",
    ),
    (
        "classifier columns in the pairs",
        b"text,label\nhello,d1\n",
        DOCS_CSV,
        "missing_column",
        1,
        "text_column",
        "the query column 'query'",
    ),
]


@pytest.mark.parametrize(
    ("case", "pairs", "documents", "code", "line", "field", "named"),
    REFUSALS,
    ids=[r[0] for r in REFUSALS],
)
def test_bad_retrieval_upload_is_refused_naming_the_problem_and_leaves_nothing(
    case, pairs, documents, code, line, field, named, scientist, tenant, artifacts_dir, settings
):
    settings.DATASET_MAX_LINE_BYTES = 65_536
    dataset = create(scientist)
    events_before = AuditEvent.objects.count()
    response = post(scientist, dataset, pairs, documents)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert error.get("line") == line
    assert named in error["message"]
    if line is not None:
        assert f"line {line}:" in error["message"]
    assert field in error["fields"]
    assert_nothing_stored(artifacts_dir, settings, events_before)


def test_a_classification_dataset_takes_no_documents(
    scientist, training_dataset, artifacts_dir, settings
):
    events_before = AuditEvent.objects.count()
    response = post(scientist, training_dataset, b"text,label\na,x\nb,y\n", DOCS_CSV)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unexpected"
    assert "documents" in response.json()["error"]["fields"]
    assert_nothing_stored(artifacts_dir, settings, events_before)


def test_a_refused_second_version_leaves_the_first_and_its_files(scientist, tenant, artifacts_dir):
    dataset = create(scientist)
    assert post(scientist, dataset, PAIRS_CSV, DOCS_CSV).status_code == 201
    before = stored_files(artifacts_dir)
    refused = post(scientist, dataset, PAIRS_CSV + b"x,nope\n", DOCS_CSV)
    assert refused.status_code == 400
    assert DatasetVersion.objects.count() == 1 and stored_files(artifacts_dir) == before


def _failing_audit(real: Any) -> Any:
    """An audit log that fails the version's record (after its bytes are stored)."""

    def failing(**kwargs: Any) -> Any:
        if kwargs["verb"] == "dataset_version.create":
            raise RuntimeError("the audit log is unavailable")
        return real(**kwargs)

    return failing


def test_a_failed_store_leaves_no_bytes_of_either_file(
    scientist, tenant, artifacts_dir, monkeypatch
):
    from apps.datasets import services

    dataset = create(scientist)
    monkeypatch.setattr(services, "audit_record", _failing_audit(services.audit_record))
    with pytest.raises(RuntimeError):
        post(scientist, dataset, PAIRS_CSV, DOCS_CSV)
    assert not DatasetVersion.objects.exists()
    assert stored_files(artifacts_dir) == []


def test_a_failed_second_version_keeps_the_pairs_file_the_first_shares(
    scientist, tenant, artifacts_dir, monkeypatch
):
    from apps.datasets import services

    dataset = create(scientist)
    assert post(scientist, dataset, PAIRS_CSV, DOCS_CSV).status_code == 201
    before = stored_files(artifacts_dir)
    monkeypatch.setattr(services, "audit_record", _failing_audit(services.audit_record))
    with pytest.raises(RuntimeError):
        post(scientist, dataset, PAIRS_CSV, DOCS_CSV + b"d4,New,A new article\n")
    assert DatasetVersion.objects.count() == 1
    assert stored_files(artifacts_dir) == before  # v1's pairs kept, v2's documents gone


def test_deleting_a_retrieval_dataset_removes_both_files(
    scientist, tenant, artifacts_dir, django_capture_on_commit_callbacks, monkeypatch
):
    from apps.datasets.tasks import delete_artifacts

    sent: list[list[str]] = []
    monkeypatch.setattr(delete_artifacts, "delay", lambda keys: sent.append(keys))
    dataset = create(scientist)
    post(scientist, dataset, PAIRS_CSV, DOCS_CSV)
    post(scientist, dataset, PAIRS_CSV, DOCS_CSV + b"d4,New,A new article\n")
    with django_capture_on_commit_callbacks(execute=True):
        assert scientist.api("delete", f"{DATASETS}{dataset}/").status_code == 204
    assert len(sent) == 1 and len(sent[0]) == 3  # the shared pairs file once
    delete_artifacts(sent[0])
    assert stored_files(artifacts_dir) == []


def test_a_classification_version_has_no_documents_download(
    scientist, reviewer, training_dataset, upload
):
    version = upload(scientist, training_dataset, "a.csv", b"text,label\na,x\nb,y\n").json()
    url = f"{DATASETS}{training_dataset}/versions/1/documents/download"
    assert scientist.client.get(url).status_code == 404
    grant(scientist, reviewer, training_dataset)
    granted = f"/api/v1/tenants/acme/granted-data/{version['id']}/"
    assert scientist.client.get(f"{granted}download").status_code == 200
    assert scientist.client.get(f"{granted}documents/download").status_code == 404


# --- dashboard ----------------------------------------------------------------------------


def test_dashboard_creates_a_retrieval_dataset_uploads_and_shows_its_profile(
    client: Client, scientist, tenant, artifacts_dir
):
    client.force_login(scientist.user)
    created = client.post(
        "/t/acme/datasets/", {"name": "kb", "kind": "training", "task": "retrieval"}
    )
    assert created.status_code == 302
    dataset = Dataset.objects.get(name="kb")
    assert dataset.task == "retrieval"
    page = client.get(f"/t/acme/datasets/{dataset.pk}/").content.decode()
    assert 'name="documents"' in page and 'value="query"' in page
    url = f"/t/acme/datasets/{dataset.pk}/versions/"
    missing = client.post(url, {"file": SimpleUploadedFile("p.csv", PAIRS_CSV)})
    assert missing.status_code == 400 and not DatasetVersion.objects.exists()
    unknown = client.post(
        url,
        {
            "file": SimpleUploadedFile("p.csv", PAIRS_CSV + b"what fees,d9\n"),
            "documents": SimpleUploadedFile("d.csv", DOCS_CSV),
        },
    )
    assert unknown.status_code == 400
    assert "Fix line 5" in unknown.content.decode() and "d9" in unknown.content.decode()
    assert not DatasetVersion.objects.exists() and stored_files(artifacts_dir) == []
    done = client.post(
        url,
        {
            "file": SimpleUploadedFile("p.csv", PAIRS_CSV),
            "documents": SimpleUploadedFile("d.csv", DOCS_CSV),
        },
        follow=True,
    )
    assert done.status_code == 200
    html = done.content.decode()
    assert "Version 1 stored: 3 pairs, 3 documents." in html
    assert 'id="documents-preview-table"' in html and "Lost cards are blocked" in html
    assert 'id="version-queries">3<' in html
    assert re.search(r'id="version-unreferenced"[^>]*>1<', html)
    assert "/versions/1/documents/download" in html


def test_dashboard_classification_upload_form_has_no_documents_field(
    client: Client, scientist, training_dataset
):
    client.force_login(scientist.user)
    page = client.get(f"/t/acme/datasets/{training_dataset}/").content.decode()
    assert 'name="file"' in page and 'name="documents"' not in page


# --- the notebook client --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_notebook_client_uploads_pairs_with_their_documents_and_loads_them_granted(
    live_server, scientist, reviewer, tenant, artifacts_dir, tmp_path
):
    from workbench.client import Workbench, WorkbenchError

    dataset = create(scientist)
    (tmp_path / "pairs.csv").write_bytes(PAIRS_CSV)
    (tmp_path / "kb.csv").write_bytes(DOCS_CSV)
    wb = Workbench(live_server.url, scientist.token, "acme")
    with pytest.raises(WorkbenchError) as refused:
        wb.upload(dataset, tmp_path / "pairs.csv")
    assert refused.value.status == 400 and "knowledge base" in refused.value.message
    version = wb.upload(dataset, tmp_path / "pairs.csv", documents=tmp_path / "kb.csv")
    assert version["number"] == 1 and version["documents_count"] == 3
    assert version["documents_original_filename"] == "kb.csv"
    assert json.loads(json.dumps(version["profile"]))["pairs"] == 3
    # Read back as granted data, as a notebook does: the pairs and their knowledge base.
    grant(scientist, reviewer, dataset)
    (granted,) = wb.datasets()
    assert (granted.documents_count, granted.documents_sha256) == (
        3,
        hashlib.sha256(DOCS_CSV).hexdigest(),
    )
    assert wb.load(version["id"])[1] == {"query": "I lost it", "document_id": "d2"}
    documents = wb.load(version["id"], documents=True)
    assert [d["id"] for d in documents] == ["d1", "d2", "d3"] and documents[1]["title"] == ""


# --- property: the reference check against the knowledge base -----------------------------

_ids = st.text(alphabet="abc d", min_size=1, max_size=3).filter(lambda s: s.strip() != "")


@hyp_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    documents=st.lists(_ids, min_size=1, max_size=8, unique=True),
    referenced=st.lists(_ids, min_size=1, max_size=12),
)
def test_pairs_are_accepted_exactly_when_every_id_is_a_document_else_the_first_is_named(
    documents, referenced, tmp_path
):
    from apps.core.errors import InvalidInput
    from apps.datasets import ingest, retrieval_ingest

    docs_path, pairs_path = tmp_path / "documents.csv", tmp_path / "pairs.csv"
    docs_path.write_bytes(
        _csv_bytes(["id", "text"], [{"id": d, "text": f"about {d}"} for d in documents])
    )
    pairs = [{"query": f"q{i}", "document_id": d} for i, d in enumerate(referenced)]
    pairs_path.write_bytes(_csv_bytes(["query", "document_id"], pairs))
    kb = retrieval_ingest.profile_documents(
        docs_path, filename="documents.csv", fmt=None, max_line_bytes=4096
    )
    profile = ingest.profile_file(
        pairs_path, filename="pairs.csv", fmt=None, text_column="query",
        label_column="document_id", need_two_labels=False, max_line_bytes=4096,
        roles=retrieval_ingest.PAIR_ROLES,
    )  # fmt: skip
    missing = [(i, d) for i, d in enumerate(referenced) if d not in documents]
    try:
        summary = retrieval_ingest.check_references(pairs_path, profile, kb)
    except InvalidInput as exc:
        assert missing, exc.message
        first_index, first_id = missing[0]
        assert exc.line == first_index + 2 and f"{first_id!r}" in exc.message
    else:
        assert not missing
        assert summary == {
            "pairs": len(referenced),
            "distinct_queries": len(referenced),
            "documents": len(documents),
            "unreferenced_documents": len(set(documents) - set(referenced)),
        }
