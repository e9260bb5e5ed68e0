"""Batch predictions of embedding and autocomplete models (issue 17): each writes what its
serving code path gives for every row — vectors by the embed path in .npy, Parquet or JSON
lines, completions by the complete path — resumes to the same bytes, refuses options its
kind cannot take, and registers (or not) as a sample dataset. Also: a job held by a dead
process of this host is taken over without waiting out its lease. The job runs in this
process by the worker's own task function (tests/test_batch_e2e.py: a real worker)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apps.audit.models import AuditEvent
from apps.batch import services
from apps.batch.models import BatchPrediction, BatchStatus
from apps.batch.tasks import execute_batch
from apps.datasets.models import DatasetVersion
from apps.tenants.models import Tenant
from tests.autocomplete_helpers import REPLIES, register_autocomplete, reply_version
from tests.conftest import Actor
from tests.embedding_helpers import knowledge_base, register_embedding
from tests.worker.serving.embedding_models import PackedEmbedder, tiny_embedder
from worker.serving.autocomplete import CompletionRequest
from worker.serving.loading import build_classifier

pytestmark = pytest.mark.django_db
API = "/api/v1/tenants/acme/batch-predictions/"


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: Any) -> PackedEmbedder:
    return tiny_embedder(tmp_path_factory.mktemp("batch-embedder"), seed=3, separate=True)


@pytest.fixture
def faq(artifacts_dir: Path, tenant: Tenant, embedder: PackedEmbedder) -> Any:
    data = knowledge_base(tenant, count=10)  # 30 stackfaq queries
    return register_embedding(tenant, "faq", embedder, data), data


def _run(job_id: str) -> BatchPrediction:
    services.batch_dispatch()
    execute_batch.run(job_id)
    return BatchPrediction.objects.get(pk=job_id)


def _download(actor: Actor, job_id: str) -> bytes:
    response = actor.api("get", f"{API}{job_id}/output")
    assert response.status_code == 200
    content = b"".join(response.streaming_content)
    assert response["X-Content-SHA256"] == hashlib.sha256(content).hexdigest()
    return content


def _queries(data: DatasetVersion) -> list[str]:
    from apps.core.artifacts import get_store

    with get_store().open(data.storage_key) as fh:
        return [r["query"] for r in csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"))]


# --- embedding ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npy", "parquet", "jsonl"])
def test_an_embedding_job_writes_the_vectors_the_embed_path_gives(
    faq: Any, scientist: Actor, embedder: PackedEmbedder, settings: Any, tmp_path: Path, fmt: str
) -> None:
    settings.BATCH_CHUNK_ROWS = 7
    version, data = faq
    body = {"model_version": version.pk, "dataset_version": data.pk, "role": "document"}
    if fmt != "npy":
        body["output_format"] = fmt
    created = scientist.api("post", API, body)
    assert created.status_code == 202, created.content
    assert created.json()["output_format"] == fmt and created.json()["model_kind"] == "embedding"
    job = _run(created.json()["id"])
    assert job.status == BatchStatus.SUCCEEDED, job.error
    assert (job.rows_done, job.chunks_done, job.dim) == (30, 5, 384)
    content = _download(scientist, job.pk)
    path = tmp_path / f"out.{fmt}"
    path.write_bytes(content)
    if fmt == "npy":
        vectors = np.load(path)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        assert table.column("row").to_pylist() == list(range(30))
        assert table.column("text").to_pylist() == _queries(data)
        vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    else:
        rows = [json.loads(line) for line in content.splitlines()]
        assert [r["row"] for r in rows] == list(range(30))
        vectors = np.asarray([r["vector"] for r in rows], dtype=np.float32)
    assert vectors.shape == (30, 384) and vectors.dtype == np.float32
    served = build_classifier(embedder.tar.read_bytes(), device="cpu")
    want = served.embed(_queries(data), "document")  # type: ignore[union-attr]
    assert np.allclose(vectors, want, atol=1e-5)
    query_side = served.embed(_queries(data)[:3], "query")  # type: ignore[union-attr]
    assert not np.allclose(vectors[:3], query_side, atol=1e-3)  # the role's encoder, not the other
    assert job.preview[0]["vector"] == [round(float(x), 4) for x in want[0][:8]]


def test_an_embedding_jobs_vectors_are_no_dataset_and_its_page_shows_them(
    faq: Any, scientist: Actor, reviewer: Actor
) -> None:
    from django.test import Client

    version, data = faq
    job_id = scientist.api("post", API, {"model_version": version.pk, "dataset_version": data.pk})
    job = _run(job_id.json()["id"])
    refused = reviewer.api("post", f"{API}{job.pk}/register", {"dataset_name": "x"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_registrable"
    page = Client()
    page.force_login(reviewer.user)
    html = page.get(f"/t/acme/batch-predictions/{job.pk}/").content.decode()
    assert "384 dimensions" in html and "Vector (first 8 of 384)" in html
    assert 'id="batch-register-form"' not in html and "Download NPY" in html


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_an_embedding_job_killed_half_way_resumes_to_the_same_bytes(
    faq: Any, scientist: Actor, settings: Any, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    settings.BATCH_CHUNK_ROWS = 4
    version, data = faq
    body = {"model_version": version.pk, "dataset_version": data.pk, "output_format": fmt}
    whole = _run(scientist.api("post", API, body).json()["id"])
    job_id = scientist.api("post", API, body).json()["id"]
    progress = services.batch_progress

    def dies_after_three(**kwargs: Any) -> str:
        verdict = progress(**kwargs)
        if kwargs["chunks_done"] == 3:
            raise SystemExit("killed")  # not an Exception: the task records no failure
        return verdict

    monkeypatch.setattr(services, "batch_progress", dies_after_three)
    services.batch_dispatch()
    with pytest.raises(SystemExit):
        execute_batch.run(job_id)
    monkeypatch.setattr(services, "batch_progress", progress)
    BatchPrediction.objects.filter(pk=job_id).update(heartbeat_at=None)  # its lease ran out
    assert services.batch_requeue_stale() == [job_id]
    resumed = _run(job_id)
    assert resumed.status == BatchStatus.SUCCEEDED and resumed.attempt == 2
    assert resumed.output_sha256 == whole.output_sha256
    assert _download(scientist, job_id) == _download(scientist, whole.pk)


# --- autocomplete ------------------------------------------------------------------------


@pytest.fixture
def replies(artifacts_dir: Path, tenant: Tenant, autocomplete_packed: Any) -> Any:
    """A reply dataset of prefixes (each reply's first two words) and the messages they
    answer, one row with nothing typed; and a registered autocomplete model."""
    rows = [(c, " ".join(r.split()[:2])) for c, r in REPLIES] + [("Hello?", "")]
    data = reply_version(tenant, "drafts", rows)
    model = register_autocomplete(tenant, "replies", autocomplete_packed, data)
    return model, data, rows


@pytest.mark.parametrize(("fmt", "completions"), [("jsonl", 1), ("csv", 2)])
def test_an_autocomplete_job_completes_each_prefix_as_the_complete_path_does(
    replies: Any, scientist: Actor, autocomplete_packed: Any, settings: Any, fmt: str,
    completions: int,
) -> None:  # fmt: skip
    settings.BATCH_CHUNK_ROWS = 3
    model, data, rows = replies
    body = {"model_version": model.pk, "dataset_version": data.pk, "output_format": fmt,
            "max_tokens": 12, "completions": completions}  # fmt: skip
    created = scientist.api("post", API, body)
    assert created.status_code == 202, created.content
    assert created.json()["context_column"] == "context"  # the reply dataset's own
    job = _run(created.json()["id"])
    assert job.status == BatchStatus.SUCCEEDED, job.error
    content = _download(scientist, job.pk).decode()
    if fmt == "jsonl":
        out = [json.loads(line) for line in content.splitlines()]
    else:
        out = list(csv.DictReader(io.StringIO(content)))
        for row in out:
            row["completions"] = json.loads(row["completions"])
    assert [int(r["row"]) for r in out] == list(range(len(rows)))
    served = build_classifier(autocomplete_packed.tar.read_bytes(), device="cpu")
    for row, (context, prefix) in zip(out, rows, strict=True):
        assert (row["prefix"], row["context"]) == (prefix, context)
        if not prefix:
            assert row["completions"] == [] and row["error"] == "prefix is empty"
            continue
        want = served.complete(  # type: ignore[union-attr]
            CompletionRequest(prefix=prefix, context=context, max_tokens=12, n=completions)
        )["completions"]
        assert [c["text"] for c in row["completions"]] == [c["text"] for c in want]
        assert row["completion"] == want[0]["text"] != ""
        assert float(row["score"]) == pytest.approx(want[0]["score"], abs=1e-4)
    # The tiny model memorised the replies: their first words complete to the rest.
    first = REPLIES[0][1]
    assert (out[0]["prefix"] + out[0]["completion"]).startswith(first[: len(first) // 2 + 8])


def test_completions_become_a_sample_reply_dataset_for_review(
    replies: Any, scientist: Actor, reviewer: Actor
) -> None:
    from django.test import Client

    model, data, rows = replies
    job = _run(
        scientist.api("post", API, {"model_version": model.pk, "dataset_version": data.pk}).json()[
            "id"
        ]
    )
    made = reviewer.api("post", f"{API}{job.pk}/register", {"dataset_name": "draft-review"})
    assert made.status_code == 201, made.content
    sample = DatasetVersion.objects.get(pk=made.json()["registered_version"])
    assert (sample.dataset.kind, sample.dataset.task) == ("sample", "text-generation")
    assert sample.rows == len(rows) - 1  # the row without a completion is left out
    assert (sample.text_column, sample.label_column) == ("text", "context")
    page = Client()
    page.force_login(reviewer.user)
    html = page.get(f"/t/acme/batch-predictions/{job.pk}/").content.decode()
    assert "Prefix → completion" in html and "(prefix is empty)" in html
    assert "prefix and completion (a reply)" in html
    # A classification sample set is not where replies go.
    reviewer.api("post", "/api/v1/tenants/acme/datasets/", {"name": "labels", "kind": "sample"})
    wrong = reviewer.api("post", f"{API}{job.pk}/register", {"dataset_name": "labels"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "not_a_sample_dataset"


# --- options a kind cannot take ----------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: Any) -> Any:
    from tests.worker.serving.models import pack, train_tiny

    root = tmp_path_factory.mktemp("batch-kinds-classifier")
    return pack(train_tiny(root / "train", seed=2), root / "model.tar")


@pytest.mark.parametrize(
    ("which", "extra", "status", "code", "field"),
    [
        ("classifier", {"output_format": "npy"}, 400, "invalid_output_format", "output_format"),
        ("classifier", {"context_column": "text"}, 400, "unexpected_field", "context_column"),
        ("embedding", {"output_format": "csv"}, 400, "invalid_output_format", "output_format"),
        ("embedding", {"role": "both"}, 400, "invalid_choice", "role"),
        ("autocomplete", {"context_column": "message"}, 400, "unknown_column", "context_column"),
        ("autocomplete", {"max_tokens": 0}, 400, "min_value", "max_tokens"),
        ("autocomplete", {"completions": 6}, 400, "max_value", "completions"),
        ("autocomplete", {"dataset_version": "FAQ"}, 400, "unsupported_dataset",
         "dataset_version"),
    ],
)  # fmt: skip
def test_options_a_kind_cannot_take_are_refused_and_change_nothing(
    faq: Any, replies: Any, scientist: Actor, tenant: Tenant, classifier: Any, which: str,
    extra: dict[str, Any], status: int, code: str, field: str,
) -> None:  # fmt: skip
    from tests.deploy_helpers import register
    from tests.training_helpers import banking_slice, make_training_version

    embedding, faq_data = faq
    autocomplete, reply_data, _ = replies
    if which == "classifier":
        model = register(scientist, tenant, "intents", classifier).pk
        data: str = make_training_version(scientist, name="b", content=banking_slice(per_label=6))
    elif which == "embedding":
        model, data = embedding.pk, faq_data.pk
    else:
        model, data = autocomplete.pk, reply_data.pk
    body = {"model_version": model, "dataset_version": data, **extra}
    body = {k: faq_data.pk if v == "FAQ" else v for k, v in body.items()}
    events = AuditEvent.objects.count()
    response = scientist.api("post", API, body)
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code and field in error["fields"], error
    assert not BatchPrediction.objects.exists() and AuditEvent.objects.count() == events


# --- a dead holder -------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_job_whose_holder_died_on_this_host_is_taken_over_without_waiting_out_its_lease(
    faq: Any, scientist: Actor
) -> None:
    import socket

    version, data = faq
    body = {"model_version": version.pk, "dataset_version": data.pk}
    gone, alive = (scientist.api("post", API, body).json()["id"] for _ in range(2))
    services.batch_dispatch()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        for job_id, pid in ((gone, _dead_pid()), (alive, sleeper.pid)):
            assert services.batch_claim(job_id=job_id, worker=f"{host}:{pid}") is not None
        # Both leases are fresh. The master of the dead one sends its task again at once:
        taken = services.batch_claim(job_id=gone, worker=f"{host}:1")
        assert taken is not None and taken.attempt == 2 and taken.claimed_by == f"{host}:1"
        assert services.batch_claim(job_id=alive, worker=f"{host}:1") is None  # still held
        assert services.batch_requeue_stale() == []  # a live holder, a fresh lease
        sleeper.kill()
        sleeper.wait()
        assert services.batch_requeue_stale() == [alive]  # gone: queued again at once
    finally:
        sleeper.kill()
    reasons = [
        e.after["reason"]
        for e in AuditEvent.objects.filter(verb="batch_prediction.requeue").order_by("created_at")
    ]
    assert reasons == ["worker process gone", "worker process gone"]
    # On another host a holder is never known dead from here: its lease says so.
    other = scientist.api("post", API, body).json()["id"]
    services.batch_dispatch()
    services.batch_claim(job_id=other, worker=f"elsewhere:{_dead_pid()}")
    assert services.batch_claim(job_id=other, worker=f"{host}:1") is None
    assert other not in services.batch_requeue_stale()


def test_the_notebook_client_reads_vectors_and_completions(
    live_server: Any, transactional_db: Any, artifacts_dir: Path, scientist: Actor,
    tenant: Tenant, embedder: PackedEmbedder, autocomplete_packed: Any,
) -> None:  # fmt: skip
    from tests.conftest import live_workers_paused
    from workbench.client import Workbench, WorkbenchError

    data = knowledge_base(tenant, count=10)
    version = register_embedding(tenant, "faq", embedder, data)
    replies = reply_version(tenant, "drafts", [(c, " ".join(r.split()[:2])) for c, r in REPLIES])
    completer = register_autocomplete(tenant, "replies", autocomplete_packed, replies)
    wb = Workbench(live_server.url, scientist.token, "acme")
    with live_workers_paused():  # the jobs run here, not on the session's worker
        vectors_job = wb.batch_predict(data.pk, model_version=version.pk, output_format="parquet")
        replies_job = wb.batch_predict(
            replies.pk, model_version=completer.pk, output_format="csv", completions=2
        )
        for job in (vectors_job, replies_job):
            _run(job["id"])
            assert wb.wait(job["id"], timeout=5, every=0.1)["status"] == "succeeded"
        vectors = wb.batch_vectors(vectors_job["id"])
        rows = wb.batch_rows(replies_job["id"])
        with pytest.raises(WorkbenchError) as not_rows:
            wb.batch_rows(vectors_job["id"])
    served = build_classifier(embedder.tar.read_bytes(), device="cpu")
    assert vectors.shape == (30, 384)
    assert np.allclose(vectors, served.embed(_queries(data), "query"), atol=1e-5)  # type: ignore[union-attr]
    assert len(rows) == len(REPLIES) and all(
        1 <= len(r["completions"]) <= 2 and r["completions"][0]["text"] == r["completion"]
        for r in rows
    )
    assert not_rows.value.code == "not_rows"
