"""Datasets and their immutable versions through the REST API."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest

from apps.audit.models import AuditEvent
from apps.datasets.models import Dataset, DatasetVersion
from tests.conftest import BANKING77, stored_files
from tests.refapp.models import VersionUser

pytestmark = pytest.mark.django_db
GOOD_CSV = (
    b"text,label\nwhere is my card,card_arrival\nI lost my card,lost_card\n"
    b"where is my card,card_arrival\n"
)


def versions_url(dataset_id: str) -> str:
    return f"/api/v1/tenants/acme/datasets/{dataset_id}/versions/"


def test_create_and_list_datasets_with_filters(scientist, reviewer):
    for name, kind in [("a-train", "training"), ("a-golden", "golden"), ("b-train", "training")]:
        assert (
            reviewer.api(
                "post", "/api/v1/tenants/acme/datasets/", {"name": name, "kind": kind}
            ).status_code
            == 201
        )
    listed = scientist.api("get", "/api/v1/tenants/acme/datasets/?kind=training").json()
    assert listed["count"] == 2
    assert {d["name"] for d in listed["results"]} == {"a-train", "b-train"}
    searched = scientist.api("get", "/api/v1/tenants/acme/datasets/?q=golden").json()
    assert [d["name"] for d in searched["results"]] == ["a-golden"]
    paged = scientist.api("get", "/api/v1/tenants/acme/datasets/?page_size=2").json()
    assert len(paged["results"]) == 2 and paged["next"]


def test_bad_dataset_fields_are_named(scientist):
    response = scientist.api(
        "post",
        "/api/v1/tenants/acme/datasets/",
        {"name": "", "kind": "weird", "task": "translation"},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]["fields"]) == {"name", "kind", "task"}
    assert not Dataset.objects.exists()


def test_duplicate_dataset_name_is_409(reviewer, training_dataset):
    response = reviewer.api(
        "post", "/api/v1/tenants/acme/datasets/", {"name": "support-intents", "kind": "golden"}
    )
    assert response.status_code == 409
    assert Dataset.objects.count() == 1


def test_viewer_cannot_create_and_is_told_the_role_needed(viewer):
    response = viewer.api(
        "post", "/api/v1/tenants/acme/datasets/", {"name": "x", "kind": "training"}
    )
    assert response.status_code == 403
    assert "'scientist'" in response.json()["error"]["message"]


def test_upload_banking77_export_with_its_own_column_names(
    scientist, training_dataset, upload, artifacts_dir
):
    raw = (BANKING77 / "train.csv").read_bytes()
    response = upload(scientist, training_dataset, "train.csv", raw, label_column="category")
    assert response.status_code == 201, response.content
    version = response.json()
    with (BANKING77 / "train.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert version["number"] == 1
    assert version["sha256"] == hashlib.sha256(raw).hexdigest()
    assert version["size_bytes"] == len(raw)
    assert version["rows"] == len(rows)
    assert version["label_count"] == 77
    expected_counts: dict[str, int] = {}
    for row in rows:
        expected_counts[row["category"]] = expected_counts.get(row["category"], 0) + 1
    assert version["labels"] == expected_counts
    assert version["duplicate_texts"] == len(rows) - len({r["text"] for r in rows})
    assert version["preview"][0] == {"text": rows[0]["text"], "label": rows[0]["category"]}
    assert version["label_column"] == "category"
    [stored] = stored_files(artifacts_dir)
    assert stored.read_bytes() == raw
    assert stored.name == version["sha256"]  # the key is ours, not the uploaded file name


def test_download_returns_exactly_the_uploaded_bytes(scientist, training_dataset, upload):
    raw = 'text,label\r\n"héllo, wörld",a\r\nsecond,b\r\n'.encode()
    version = upload(scientist, training_dataset, "odd name ../../x.csv", raw).json()
    response = scientist.client.get(f"{versions_url(training_dataset)}{version['number']}/download")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == raw
    assert response["X-Content-SHA256"] == hashlib.sha256(raw).hexdigest()
    by_id = scientist.client.get(f"{versions_url(training_dataset)}{version['id']}/download")
    assert b"".join(by_id.streaming_content) == raw


def test_jsonl_upload(scientist, training_dataset, upload):
    lines = [{"utterance": "hi there", "intent": "greet"}, {"utterance": "bye", "intent": "leave"}]
    raw = "\n".join(json.dumps(x) for x in lines).encode() + b"\n"
    response = upload(
        scientist,
        training_dataset,
        "data.jsonl",
        raw,
        text_column="utterance",
        label_column="intent",
    )
    assert response.status_code == 201, response.content
    assert response.json()["format"] == "jsonl"
    assert response.json()["labels"] == {"greet": 1, "leave": 1}


def test_same_bytes_again_return_the_existing_version(
    scientist, training_dataset, upload, artifacts_dir
):
    first = upload(scientist, training_dataset, "a.csv", GOOD_CSV)
    second = upload(scientist, training_dataset, "b.csv", GOOD_CSV)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert DatasetVersion.objects.count() == 1
    assert len(stored_files(artifacts_dir)) == 1
    third = upload(scientist, training_dataset, "c.csv", GOOD_CSV + b"new row,lost_card\n")
    assert third.json()["number"] == 2


def test_versions_are_immutable_through_the_api(scientist, training_dataset, upload):
    version = upload(scientist, training_dataset, "a.csv", GOOD_CSV).json()
    url = f"{versions_url(training_dataset)}{version['number']}/"
    assert scientist.api("patch", url, {"rows": 1}).status_code == 405
    assert scientist.api("delete", url).status_code == 405
    assert scientist.api("put", url, {"rows": 1}).status_code == 405


BAD_FILES = [
    ("empty", b"", "empty", None),
    ("binary", b"text,label\nabc,x\n\x00\x01\x02\x03,y\n", "binary", 3),
    ("latin-1", "text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"), "encoding", 3),
    ("missing column", b"text,category\nhello,a\nbye,b\n", "missing_column", 1),
    ("empty text", b"text,label\nhello,a\n   ,b\nbye,b\n", "empty_text", 3),
    ("empty label", b"text,label\nhello,a\nworld,\n", "empty_label", 3),
    ("single label", b"text,label\nhello,a\nworld,a\n", "single_label", None),
    ("ragged row", b"text,label\nhello,a\nworld,b,extra\n", "csv", 3),
    ("header only", b"text,label\n", "empty", None),
    ("bad json", b'{"text": "a", "label": "x"}\n{"text": oops}\n', "json", 2),
    ("long line", b"text,label\nhello,a\n" + b"x" * 70_000 + b",b\n", "line_too_long", 3),
]


@pytest.mark.parametrize(
    ("case", "content", "code", "line"), BAD_FILES, ids=[c[0] for c in BAD_FILES]
)
def test_bad_upload_is_refused_naming_the_problem_and_leaves_nothing(
    case, content, code, line, scientist, training_dataset, upload, artifacts_dir, settings
):
    settings.DATASET_MAX_LINE_BYTES = 65_536
    events_before = AuditEvent.objects.count()
    filename = "data.jsonl" if case == "bad json" else "data.csv"
    response = upload(scientist, training_dataset, filename, content)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert error.get("line") == line
    if line is not None:
        assert error["message"].startswith(f"line {line}:")
    assert not DatasetVersion.objects.exists()
    assert stored_files(artifacts_dir) == []
    assert AuditEvent.objects.count() == events_before
    assert list(settings.UPLOAD_TMP_DIR.glob("upload-*")) == []


def test_golden_set_may_have_a_single_label(reviewer, golden_dataset, upload):
    response = upload(reviewer, golden_dataset, "g.csv", b"text,label\nhello,a\nworld,a\n")
    assert response.status_code == 201


def test_file_over_the_size_limit_is_413_and_leaves_nothing(
    scientist, training_dataset, upload, artifacts_dir, settings
):
    settings.DATASET_MAX_UPLOAD_BYTES = 1000
    response = upload(
        scientist, training_dataset, "big.csv", b"text,label\n" + b"hello there,a\n" * 200
    )
    assert response.status_code == 413
    assert "1,000 bytes" in response.json()["error"]["message"]
    assert not DatasetVersion.objects.exists()
    assert stored_files(artifacts_dir) == []
    assert list(settings.UPLOAD_TMP_DIR.glob("upload-*")) == []


def test_missing_file_field_is_a_field_error(scientist, training_dataset):
    response = scientist.client.post(versions_url(training_dataset), {"text_column": "text"})
    assert response.status_code == 400
    assert "file" in response.json()["error"]["fields"]


def test_referenced_dataset_cannot_be_deleted(scientist, training_dataset, upload, artifacts_dir):
    version = upload(scientist, training_dataset, "a.csv", GOOD_CSV).json()
    VersionUser.objects.create(version_id=version["id"])
    response = scientist.api("delete", f"/api/v1/tenants/acme/datasets/{training_dataset}/")
    assert response.status_code == 409
    assert "used by" in response.json()["error"]["message"]
    assert DatasetVersion.objects.filter(pk=version["id"]).exists()
    assert len(stored_files(artifacts_dir)) == 1


def test_unreferenced_dataset_is_deleted_and_audited(
    scientist, training_dataset, upload, tenant, django_capture_on_commit_callbacks
):
    upload(scientist, training_dataset, "a.csv", GOOD_CSV)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = scientist.api("delete", f"/api/v1/tenants/acme/datasets/{training_dataset}/")
    assert response.status_code == 204
    assert not Dataset.objects.filter(pk=training_dataset).exists()
    assert len(callbacks) == 1  # the artifact clean-up is enqueued only after commit
    event = AuditEvent.objects.get(verb="dataset.delete")
    assert event.before is not None and event.before["versions"] == [1]


def test_audit_api_lists_and_filters_events(scientist, training_dataset, upload):
    upload(scientist, training_dataset, "a.csv", GOOD_CSV)
    body = scientist.api("get", "/api/v1/tenants/acme/audit/?verb=dataset_version.create").json()
    assert body["count"] == 1
    event = body["results"][0]
    assert event["actor"] == "sam" and event["object_type"] == "datasetversion"
    assert event["after"]["rows"] == 3
    by_actor = scientist.api("get", "/api/v1/tenants/acme/audit/?actor=sam").json()
    assert {e["verb"] for e in by_actor["results"]} >= {"dataset.create", "dataset_version.create"}


def test_audit_events_cannot_be_changed_or_deleted(scientist, training_dataset):
    from django.db import DatabaseError, connection, transaction

    event = AuditEvent.objects.first()
    assert event is not None
    with pytest.raises(RuntimeError):
        event.save()
    with pytest.raises(RuntimeError):
        event.delete()
    statements = ["UPDATE audit_auditevent SET verb = 'x'"]
    if connection.vendor == "postgresql":  # SQLite keeps DELETE for Django's test flush
        statements.append("DELETE FROM audit_auditevent")
    for sql in statements:
        with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    assert AuditEvent.objects.filter(verb="dataset.create").count() == 1


def test_openapi_schema_names_every_operation(scientist):
    response = scientist.client.get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    paths = json.loads(response.content)["paths"]
    for expected in [
        "/api/v1/tenants/",
        "/api/v1/tokens/",
        "/api/v1/tenants/{tenant}/members/",
        "/api/v1/tenants/{tenant}/datasets/{dataset_id}/versions/",
        "/api/v1/tenants/{tenant}/datasets/{dataset_id}/versions/{version}/download",
        "/api/v1/tenants/{tenant}/audit/",
    ]:
        assert expected in paths
    assert scientist.client.get("/api/v1/docs/").status_code == 200


# --- golden and sample sets: the gates' yardsticks, changed by reviewers and admins only ---


@pytest.mark.parametrize("kind", ["golden", "sample"])
def test_only_reviewers_and_admins_create_and_change_golden_and_sample_sets(
    kind, scientist, reviewer, admin, upload, artifacts_dir
):
    datasets = "/api/v1/tenants/acme/datasets/"
    refused = scientist.api("post", datasets, {"name": "yardstick", "kind": kind})
    assert refused.status_code == 403
    assert "'reviewer'" in refused.json()["error"]["message"]
    assert not Dataset.objects.exists()
    created = reviewer.api("post", datasets, {"name": "yardstick", "kind": kind})
    assert created.status_code == 201, created.content
    dataset = created.json()["id"]
    assert upload(scientist, dataset, "g.csv", GOOD_CSV).status_code == 403
    assert not DatasetVersion.objects.exists() and stored_files(artifacts_dir) == []
    edit = scientist.api("patch", f"{datasets}{dataset}/", {"description": "mine now"})
    assert edit.status_code == 403
    assert scientist.api("delete", f"{datasets}{dataset}/").status_code == 403
    assert Dataset.objects.get(pk=dataset).description == ""
    assert upload(reviewer, dataset, "g.csv", GOOD_CSV).status_code == 201
    assert upload(admin, dataset, "g2.csv", GOOD_CSV + b"more,lost_card\n").status_code == 201
    assert reviewer.api("patch", f"{datasets}{dataset}/", {"description": "v2"}).status_code == 200
    # Scientists still read them, and keep their own training sets.
    assert scientist.api("get", f"{datasets}{dataset}/versions/").json()["count"] == 2
    training = scientist.api("post", datasets, {"name": "mine", "kind": "training"})
    assert training.status_code == 201
    assert upload(scientist, training.json()["id"], "t.csv", GOOD_CSV).status_code == 201


# --- upload cleanup: bytes go only when no version references them ------------------------


def _store_directly(actor, dataset_id, tmp_path, content=GOOD_CSV):
    from apps.datasets import services

    path = tmp_path / f"upload-{hashlib.sha256(content).hexdigest()[:8]}.csv"
    path.write_bytes(content)
    return services.dataset_version_create(
        actor=actor.user, dataset=Dataset.objects.get(pk=dataset_id), path=path,
        sha256=hashlib.sha256(content).hexdigest(), size_bytes=len(content), filename="a.csv",
    )  # fmt: skip


def _audit_fails_once(monkeypatch):
    """The upload's audit write fails once (after its bytes are stored), then works."""
    from apps.datasets import services

    real, failed = services.audit_record, []

    def audit(**kwargs):
        if not failed:
            failed.append(kwargs["verb"])
            raise RuntimeError("the audit log is unavailable")
        return real(**kwargs)

    monkeypatch.setattr(services, "audit_record", audit)
    return failed


def test_a_failed_upload_leaves_no_bytes_nobody_references(
    scientist, training_dataset, artifacts_dir, tmp_path, monkeypatch
):
    failed = _audit_fails_once(monkeypatch)
    with pytest.raises(RuntimeError, match="audit log"):
        _store_directly(scientist, training_dataset, tmp_path)
    assert failed == ["dataset_version.create"]
    assert not DatasetVersion.objects.exists() and stored_files(artifacts_dir) == []


def test_a_failed_upload_keeps_the_bytes_of_a_twin_a_concurrent_retry_committed(
    scientist, training_dataset, upload, artifacts_dir, tmp_path, monkeypatch
):
    """The race, made deterministic: an upload stores its bytes and then fails; before its
    cleanup runs, a retry of the same file commits its version, whose content-addressed key
    is the same. The cleanup must leave those bytes where the twin version finds them."""
    from apps.datasets import services

    failed = _audit_fails_once(monkeypatch)
    cleanup, retried = services.discard_unreferenced, []

    def retry_commits_first(**kwargs):
        retried.append(upload(scientist, training_dataset, "a.csv", GOOD_CSV))
        return cleanup(**kwargs)

    monkeypatch.setattr(services, "discard_unreferenced", retry_commits_first)
    with pytest.raises(RuntimeError, match="audit log"):
        _store_directly(scientist, training_dataset, tmp_path)
    assert failed == ["dataset_version.create"] and retried[0].status_code == 201
    (version,) = DatasetVersion.objects.all()
    assert [p.name for p in stored_files(artifacts_dir)] == [version.sha256]
    download = scientist.client.get(f"{versions_url(training_dataset)}1/download")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == GOOD_CSV
