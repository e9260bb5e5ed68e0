"""Reply corpora (task ``text-generation``): agent replies with the message each answers.

Uploads go through the real upload handler, services and artifact store (REST, dashboard
and the notebook client); the stored file is read back by ``worker.reply_data`` as the
training and evaluation workers read it. The realistic data is a slice of the shared SGD
banking replies, read from ../shared.
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
from django.core.management import call_command
from django.test import Client
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from apps.audit.models import AuditEvent
from apps.core.artifacts import get_store
from apps.core.errors import InvalidInput
from apps.datasets import reply_ingest
from apps.datasets.models import Dataset, DatasetVersion
from tests.conftest import Actor, stored_files
from worker import autocomplete_text
from worker.reply_data import Reply, read_replies
from worker.training.config import DataSpec

pytestmark = pytest.mark.django_db

SGD_BANKS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sgd-replies" / "banks_1"
DATASETS = "/api/v1/tenants/acme/datasets/"
# Figures by hand, with the word definition of worker.autocomplete_text: "Sorry to hear
# that. Which card?" is 8 words (the point and the question mark are words), "Anything
# else?" 3; 10 distinct words; the second reply's context is blank (no context).
REPLIES_CSV = (
    b'context,text\n"Hi, I lost my card.",Sorry to hear that. Which card?\n'
    b",Anything else?\nThanks!,Anything else?\n"
)
REPLIES_PROFILE = {
    "replies": 3,
    "words": 14,
    "vocabulary_size": 10,
    "longest_reply_words": 8,
    "with_context": 2,
    "mean_reply_words": 4.67,
}


def create(actor: Actor, name: str = "agent-replies", kind: str = "training") -> str:
    response = actor.api("post", DATASETS, {"name": name, "kind": kind, "task": "text-generation"})
    assert response.status_code == 201, response.content
    assert response.json()["task"] == "text-generation"
    return str(response.json()["id"])


def post(actor: Actor, dataset_id: str, content: bytes, name: str = "r.csv", **fields: Any) -> Any:
    data = {"file": SimpleUploadedFile(name, content), **fields}
    return actor.client.post(f"{DATASETS}{dataset_id}/versions/", data)


def assert_nothing_stored(artifacts_dir: Path, settings: Any, events_before: int) -> None:
    assert not DatasetVersion.objects.exists()
    assert stored_files(artifacts_dir) == []
    assert AuditEvent.objects.count() == events_before
    assert list(Path(settings.UPLOAD_TMP_DIR).glob("upload-*")) == []


def read_back(version: DatasetVersion, tmp_path: Path) -> list[Reply]:
    """The version's stored bytes read as a training worker reads them: a DataSpec of the
    version's columns (as apps.training.runner builds it), through worker.reply_data."""
    path = tmp_path / f"v{version.number}.{version.format}"
    path.write_bytes(b"".join(get_store().iter_bytes(version.storage_key)))
    spec = DataSpec(
        path=path,
        text_column=version.text_column,
        label_column=version.label_column,
        format=version.format,
    )
    return read_replies(spec)


# --- uploads through the REST API --------------------------------------------------------


def test_a_reply_corpus_is_stored_with_its_profile_and_read_back_by_the_worker(
    scientist, tenant, artifacts_dir, tmp_path
):
    dataset = create(scientist)
    response = post(scientist, dataset, REPLIES_CSV)
    assert response.status_code == 201, response.content
    version = response.json()
    assert version["profile"] == REPLIES_PROFILE
    assert (version["text_column"], version["label_column"]) == ("text", "context")
    assert version["rows"] == 3 and version["labels"] == {} and version["label_count"] == 0
    assert version["duplicate_texts"] == 1  # "Anything else?" again: counted, not refused
    assert version["preview"] == [
        {"text": "Sorry to hear that. Which card?", "context": "Hi, I lost my card."},
        {"text": "Anything else?", "context": ""},
        {"text": "Anything else?", "context": "Thanks!"},
    ]
    assert version["sha256"] == hashlib.sha256(REPLIES_CSV).hexdigest()
    assert version["documents_sha256"] == "" and version["documents_count"] == 0
    # The bytes as uploaded, downloadable with their hash.
    got = scientist.client.get(f"{DATASETS}{dataset}/versions/1/download")
    assert got.status_code == 200 and b"".join(got.streaming_content) == REPLIES_CSV
    assert got["X-Content-SHA256"] == version["sha256"]
    assert scientist.client.get(f"{DATASETS}{dataset}/versions/1/").json() == version
    event = AuditEvent.objects.get(verb="dataset_version.create")
    assert event.after is not None and event.after["profile"] == REPLIES_PROFILE
    assert read_back(DatasetVersion.objects.get(), tmp_path) == [
        Reply("Sorry to hear that. Which card?", "Hi, I lost my card."),
        Reply("Anything else?", ""),
        Reply("Anything else?", "Thanks!"),
    ]


@pytest.fixture(scope="module")
def sgd_slice() -> list[dict[str, str]]:
    if not SGD_BANKS.exists():
        pytest.skip("../shared/datasets/sgd-replies is not here")
    with (SGD_BANKS / "train.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))[:60]


def test_an_sgd_banking_slice_profiles_as_its_words_count(
    scientist, tenant, artifacts_dir, sgd_slice, tmp_path
):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["context", "text"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(sgd_slice)
    response = post(scientist, create(scientist), out.getvalue().encode(), name="train.csv")
    assert response.status_code == 201, response.content
    per_reply = [autocomplete_text.words(row["text"]) for row in sgd_slice]
    total = sum(map(len, per_reply))
    assert response.json()["profile"] == {
        "replies": 60,
        "words": total,
        "vocabulary_size": len({w for ws in per_reply for w in ws}),
        "longest_reply_words": max(map(len, per_reply)),
        "with_context": sum(1 for row in sgd_slice if row["context"].strip()),
        "mean_reply_words": round(total / 60, 2),
    }
    assert response.json()["duplicate_texts"] == 60 - len({row["text"] for row in sgd_slice})
    replies = read_back(DatasetVersion.objects.get(), tmp_path)
    assert [(r.text, r.context) for r in replies] == [(e["text"], e["context"]) for e in sgd_slice]


def test_the_same_bytes_are_the_same_version_other_bytes_the_next(scientist, tenant, artifacts_dir):
    dataset = create(scientist)
    first = post(scientist, dataset, REPLIES_CSV)
    again = post(scientist, dataset, REPLIES_CSV)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    second = post(scientist, dataset, REPLIES_CSV + b"Bye.,Goodbye!\n")
    assert second.status_code == 201 and second.json()["number"] == 2
    assert second.json()["profile"]["replies"] == 4
    assert len(stored_files(artifacts_dir)) == 2


def test_a_corpus_without_context_is_accepted_csv_and_jsonl(
    scientist, tenant, artifacts_dir, tmp_path
):
    dataset = create(scientist)
    plain = post(scientist, dataset, b"text\nHello there.\nHow can I help?\n")
    assert plain.status_code == 201, plain.content
    version = plain.json()
    assert version["label_column"] == "" and version["profile"]["with_context"] == 0
    assert version["preview"][0] == {"text": "Hello there.", "context": ""}
    # JSON lines: a line may leave the context out or make it null; one line having it
    # makes "context" the version's context column.
    lines = [{"text": "Hi."}, {"text": "Yes, it is.", "context": "Is it open?"}, {"text": "Ok."}]
    lines[2]["context"] = None  # type: ignore[assignment]
    body = "\n".join(json.dumps(line) for line in lines).encode() + b"\n"
    mixed = post(scientist, dataset, body, name="r.jsonl")
    assert mixed.status_code == 201, mixed.content
    assert mixed.json()["format"] == "jsonl" and mixed.json()["label_column"] == "context"
    assert mixed.json()["profile"]["with_context"] == 1
    stored = DatasetVersion.objects.get(number=2)
    assert read_back(stored, tmp_path) == [
        Reply("Hi."),
        Reply("Yes, it is.", "Is it open?"),
        Reply("Ok."),
    ]
    assert read_back(DatasetVersion.objects.get(number=1), tmp_path) == [
        Reply("Hello there."),
        Reply("How can I help?"),
    ]


def test_mapped_reply_and_context_columns(scientist, tenant, artifacts_dir, tmp_path):
    dataset = create(scientist)
    body = b"message,reply,agent\nWhere is it?,On its way.,a1\n"
    response = post(scientist, dataset, body, text_column="reply", context_column="message")
    assert response.status_code == 201, response.content
    assert (response.json()["text_column"], response.json()["label_column"]) == (
        "reply",
        "message",
    )
    assert read_back(DatasetVersion.objects.get(), tmp_path) == [
        Reply("On its way.", "Where is it?")
    ]


INVALID_UTF8 = b"context,text\nhi,caf\xe9\n"
REFUSALS = [
    # case, file, fields, code, line, field, named in the message
    (
        "missing text column",
        b"context,reply\nhi,hello\n",
        {},
        "missing_column",
        1,
        "text_column",
        "'text'",
    ),
    (
        "missing mapped text column",
        b"context,text\nhi,hello\n",
        {"text_column": "answer"},
        "missing_column",
        1,
        "text_column",
        "'answer'",
    ),
    ("blank text", b"context,text\nhi,hello\nthere,  \n", {}, "empty_text", 3, "file", "empty"),
    (
        "blank jsonl text",
        b'{"text": "ok"}\n\n{"text": ""}\n',
        {},
        "empty_text",
        3,
        "file",
        "empty",
    ),
    (
        "named context column missing",
        REPLIES_CSV,
        {"context_column": "message"},
        "missing_column",
        1,
        "context_column",
        "'message'",
    ),
    (
        "named jsonl context in no line",
        b'{"text": "ok"}\n',
        {"context_column": "message"},
        "missing_column",
        None,
        "context_column",
        "'message'",
    ),
    (
        "label column on a reply corpus",
        REPLIES_CSV,
        {"label_column": "context"},
        "invalid",
        None,
        "label_column",
        "context_column",
    ),
    ("empty file", b"", {}, "empty", None, "file", "empty"),
    ("header only", b"context,text\n", {}, "empty", None, "file", "no rows"),
    ("invalid utf-8", INVALID_UTF8, {}, "encoding", 2, "file", "UTF-8"),
    ("ragged csv", b"context,text\nhi,hello,extra\n", {}, "csv", 2, "file", "3"),
    ("jsonl text not a string", b'{"text": 3}\n', {}, "json", 1, "file", "string"),
    ("jsonl context not a string", b'{"text": "a", "context": 1}\n', {}, "json", 1, "file", "null"),
]


@pytest.mark.parametrize(
    ("case", "content", "fields", "code", "line", "field", "named"),
    REFUSALS,
    ids=[r[0] for r in REFUSALS],
)
def test_a_bad_reply_corpus_is_refused_naming_the_problem_and_stores_nothing(
    case, content, fields, code, line, field, named, scientist, tenant, artifacts_dir, settings
):
    dataset = create(scientist)
    events_before = AuditEvent.objects.count()
    name = "r.jsonl" if content.startswith(b"{") else "r.csv"
    response = post(scientist, dataset, content, name=name, **fields)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error.get("line") == line, error
    assert named in error["message"], error
    if line is not None:
        assert f"line {line}:" in error["message"]
    assert field in error["fields"], error
    assert_nothing_stored(artifacts_dir, settings, events_before)


def test_a_classification_dataset_takes_no_context_column(
    scientist, training_dataset, artifacts_dir, settings
):
    events_before = AuditEvent.objects.count()
    response = post(
        scientist, training_dataset, b"text,label\na,x\nb,y\n", context_column="context"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unexpected"
    assert "context_column" in response.json()["error"]["fields"]
    assert_nothing_stored(artifacts_dir, settings, events_before)


def test_a_reply_corpus_takes_no_documents(scientist, tenant, artifacts_dir, settings):
    dataset = create(scientist)
    events_before = AuditEvent.objects.count()
    data = {
        "file": SimpleUploadedFile("r.csv", REPLIES_CSV),
        "documents": SimpleUploadedFile("d.csv", b"id,text\nd1,x\n"),
    }
    response = scientist.client.post(f"{DATASETS}{dataset}/versions/", data)
    assert response.status_code == 400 and "documents" in response.json()["error"]["fields"]
    assert_nothing_stored(artifacts_dir, settings, events_before)


def test_a_golden_reply_set_is_the_reviewers_to_write(scientist, reviewer, tenant, artifacts_dir):
    refused = scientist.api(
        "post", DATASETS, {"name": "g", "kind": "golden", "task": "text-generation"}
    )
    assert refused.status_code == 403
    golden = create(reviewer, name="reply-golden", kind="golden")
    assert post(reviewer, golden, REPLIES_CSV).status_code == 201
    # The list's task filter (the API's and the dashboard's) finds reply corpora.
    create(scientist, name="intents-like")  # another text-generation set
    scientist.api("post", DATASETS, {"name": "intents", "kind": "training"})
    listed = scientist.api("get", f"{DATASETS}?task=text-generation").json()["results"]
    assert sorted(d["name"] for d in listed) == ["intents-like", "reply-golden"]
    assert {d["latest_version"] for d in listed} == {1, None}
    scientist.client.force_login(scientist.user)
    page = scientist.client.get("/t/acme/datasets/?task=text-generation").content.decode()
    assert "reply-golden" in page and ">intents<" not in page


def test_the_schema_documents_the_reply_corpus_upload(admin):
    schema = json.loads(admin.client.get("/api/v1/schema/?format=json").content)
    components = schema["components"]["schemas"]
    tasks = [s for s in components.values() if "text-generation" in s.get("enum", [])]
    assert tasks, "the task enum lists text-generation"
    upload = schema["paths"]["/api/v1/tenants/{tenant}/datasets/{dataset_id}/versions/"]["post"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = components[form["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert (
        "context_column" in fields and "text-generation" in fields["context_column"]["description"]
    )
    output = components["DatasetVersionOutput"]["properties"]
    assert "mean_reply_words" in output["profile"]["description"]
    assert "context column" in output["label_column"]["description"]


# --- dashboard ----------------------------------------------------------------------------


def test_dashboard_creates_a_reply_corpus_uploads_and_shows_its_preview_and_profile(
    client: Client, scientist, tenant, artifacts_dir
):
    client.force_login(scientist.user)
    created = client.post(
        "/t/acme/datasets/", {"name": "replies", "kind": "training", "task": "text-generation"}
    )
    assert created.status_code == 302
    dataset = Dataset.objects.get(name="replies")
    page = client.get(f"/t/acme/datasets/{dataset.pk}/").content.decode()
    assert 'name="context_column"' in page and 'value="context"' in page
    assert 'name="label_column"' not in page and 'name="documents"' not in page
    url = f"/t/acme/datasets/{dataset.pk}/versions/"
    blank = client.post(url, {"file": SimpleUploadedFile("r.csv", b"context,text\nhi,\n")})
    assert blank.status_code == 400
    assert "Fix line 2" in blank.content.decode() and "is empty" in blank.content.decode()
    assert not DatasetVersion.objects.exists() and stored_files(artifacts_dir) == []
    done = client.post(
        url,
        {"file": SimpleUploadedFile("r.csv", REPLIES_CSV), "context_column": "context"},
        follow=True,
    )
    assert done.status_code == 200
    html = done.content.decode()
    assert "Version 1 stored: 3 replies, 2 with context." in html
    assert re.search(r'id="version-rows"[^>]*>3<', html)
    assert 'id="version-words">14<' in html and 'id="version-vocabulary"' in html
    assert re.search(r'id="version-vocabulary"[^>]*>10<', html)
    assert 'id="version-longest">8 words<' in html and 'id="version-mean">4.7 words<' in html
    assert 'id="version-with-context">2<' in html
    assert re.search(r'id="version-duplicates"[^>]*>1<', html)
    preview = html.split('id="preview-table"', 1)[1].split("</table>", 1)[0]
    assert "Hi, I lost my card." in preview and "Sorry to hear that. Which card?" in preview
    assert "<td>—</td>" in preview  # the reply without context
    mapped = client.post(
        url,
        {
            "file": SimpleUploadedFile("m.csv", b"message,reply\nWhere?,Here.\n"),
            "text_column": "reply",
            "context_column": "message",
        },
    )
    assert mapped.status_code == 302
    assert DatasetVersion.objects.get(number=2).label_column == "message"


# --- property: the upload's checks and the worker's reader agree -------------------------

_values = st.text(alphabet=st.sampled_from("ab ,.\"'?\né"), max_size=12)


@hyp_settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(st.tuples(_values, _values), min_size=1, max_size=8),
    as_jsonl=st.booleans(),
)
def test_a_corpus_is_accepted_exactly_when_every_reply_has_text_and_reads_back_as_written(
    rows: list[tuple[str, str]], as_jsonl: bool, tmp_path_factory: Any
) -> None:
    path = tmp_path_factory.mktemp("corpus") / ("r.jsonl" if as_jsonl else "r.csv")
    if as_jsonl:
        body = "".join(json.dumps({"context": c, "text": t}) + "\n" for c, t in rows)
    else:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([("context", "text"), *rows])
        body = out.getvalue()
    path.write_text(body, encoding="utf-8")
    blank = [i for i, (_, text) in enumerate(rows) if not text.strip()]
    try:
        profile = reply_ingest.profile_replies(
            path,
            filename=path.name,
            fmt=None,
            text_column="text",
            context_column=None,
            max_line_bytes=65_536,
        )
    except InvalidInput as exc:
        assert blank, exc.message
        assert exc.code == "empty_text"
        # The line named is the first blank reply's (a CSV value may span lines).
        first = blank[0]
        if as_jsonl:
            assert exc.line == first + 1
        else:
            assert exc.line == 2 + first + sum(
                t.count("\n") + c.count("\n") for c, t in rows[:first]
            )
        return
    assert not blank
    words = [autocomplete_text.words(text) for _, text in rows]
    assert profile.summary == {
        "replies": len(rows),
        "words": sum(map(len, words)),
        "vocabulary_size": len({w for ws in words for w in ws}),
        "longest_reply_words": max(map(len, words)),
        "with_context": sum(1 for context, _ in rows if context.strip()),
        "mean_reply_words": round(sum(map(len, words)) / len(rows), 2),
    }
    assert profile.duplicate_texts == len(rows) - len({text for _, text in rows})
    assert profile.context_column == "context"
    spec = DataSpec(path=path, text_column="text", label_column="context", format=profile.format)
    # A blank context is no context.
    assert read_replies(spec) == [Reply(text, c if c.strip() else "") for c, text in rows]
    assert profile.preview == [
        {"text": text, "context": c if c.strip() else ""} for c, text in rows[:5]
    ]


# --- the demo seed ----------------------------------------------------------------------


def test_the_demo_seed_gives_the_demo_tenant_sgd_banking_replies_and_a_golden_set(
    artifacts_dir, tmp_path
):
    if not SGD_BANKS.exists():
        pytest.skip("../shared/datasets/sgd-replies is not here")
    absent = tmp_path / "absent"  # the other seeds skip: only the replies are read
    args = {"data_dir": absent, "stackfaq_dir": absent}
    call_command("seed_demo", **args, stderr=io.StringIO())
    call_command("seed_demo", **args, stderr=io.StringIO())  # idempotent
    train = Dataset.objects.get(tenant__slug="demo", name="sgd-banks-replies")
    golden = Dataset.objects.get(tenant__slug="demo", name="sgd-banks-replies-golden")
    assert (train.task, train.kind, golden.task, golden.kind) == (
        "text-generation",
        "training",
        "text-generation",
        "golden",
    )
    v_train, v_golden = train.versions.get(), golden.versions.get()
    # Figures of banks_1 as worker.autocomplete_text counts its words.
    assert v_train.profile == {
        "replies": 1313,
        "words": 14458,
        "vocabulary_size": 781,
        "longest_reply_words": 39,
        "with_context": 1313,
        "mean_reply_words": 11.01,
    }
    assert v_train.duplicate_texts == 220 and v_train.label_column == "context"
    assert v_golden.profile["replies"] == 172 and v_golden.created_by.username == "reviewer"
    assert v_train.sha256 == hashlib.sha256((SGD_BANKS / "train.csv").read_bytes()).hexdigest()
    assert (SGD_BANKS / "train.csv").is_file()  # read from ../shared, not moved away


def test_the_demo_seed_skips_a_missing_reply_corpus_saying_so(artifacts_dir, tmp_path):
    absent = tmp_path / "absent"
    err = io.StringIO()
    call_command("seed_demo", data_dir=absent, stackfaq_dir=absent, replies_dir=absent, stderr=err)
    assert f"skipped sgd-banks-replies: {absent / 'train.csv'} not found" in err.getvalue()
    assert "skipped sgd-banks-replies-golden" in err.getvalue()
    assert not DatasetVersion.objects.exists()


# --- the notebook client --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_notebook_client_uploads_a_reply_corpus_with_its_context_column(
    live_server, scientist, reviewer, tenant, artifacts_dir, tmp_path
):
    from workbench.client import Workbench, WorkbenchError

    dataset = create(scientist)
    (tmp_path / "replies.csv").write_bytes(b"message,text\nWhere is it?,On its way.\n")
    wb = Workbench(live_server.url, scientist.token, "acme")
    with pytest.raises(WorkbenchError) as refused:
        wb.upload(dataset, tmp_path / "replies.csv", context_column="msg")
    assert refused.value.status == 400 and "'msg'" in refused.value.message
    version = wb.upload(dataset, tmp_path / "replies.csv", context_column="message")
    assert version["number"] == 1 and version["label_column"] == "message"
    assert version["profile"]["with_context"] == 1
    assert version["preview"] == [{"text": "On its way.", "context": "Where is it?"}]
    # Read back as granted data, as a notebook does.
    asked = scientist.api(
        "post",
        "/api/v1/tenants/acme/data-access/",
        {"dataset": dataset, "purpose": "look at the replies"},
    )
    assert asked.status_code == 201, asked.content
    decided = f"/api/v1/tenants/acme/data-access/{asked.json()['id']}/grant"
    assert reviewer.api("post", decided, {}).status_code == 200
    (granted,) = wb.datasets()
    assert granted.profile["replies"] == 1 and granted.label_column == "message"
    assert wb.load(version["id"]) == [{"message": "Where is it?", "text": "On its way."}]
