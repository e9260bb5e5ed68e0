"""An autocomplete model evaluated on a golden reply corpus beside the tenant's word trigram;
the ``autocomplete`` policy's gates; the review page's figures and held-out completions.

The models are real :class:`worker.autocomplete.Completer` artifacts, built here through the
contract's interface (``train_tokenizer``, ``gpt2_config``, ``write_completer_dir``, the
meta and sequence layout it fixes): a tiny GPT-2 that memorised the golden replies (so it
beats the trigram, which was fitted on other replies of the same service) and a random one.
Data: slices of the shared SGD ``banks_1`` replies, stored as text-generation versions.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from apps.audit.models import AuditEvent
from apps.core.artifacts import get_store
from apps.datasets.models import Dataset, DatasetVersion, Task
from apps.evaluation import services
from apps.evaluation.models import EvalStatus, Evaluation, PromotionPolicy
from apps.evaluation.tasks import run_evaluation
from apps.promotions import services as promotions
from apps.promotions.gates import check_gates
from apps.registry.models import ModelKind, ModelVersion, Stage
from apps.registry.services import model_version_create
from apps.training.models import TrainingRun
from apps.training.packaging import pack_dir
from tests.training_helpers import make_training_version
from worker import base_models
from worker.autocomplete_text import words

API = "/api/v1/tenants/acme"
SGD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sgd-replies" / "banks_1"
GOLDEN_REPLIES = 6
TRAIN_REPLIES = 60
FIGURES = ("next_word_top1", "next_word_top3", "exact_match", "keystrokes_saved")


def sgd_rows(split: str, count: int, *, words: int = 4) -> list[dict[str, str]]:
    """The first ``count`` replies of ``split`` with at least ``words`` words."""
    with (SGD / f"{split}.csv").open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if len(r["text"].split()) >= words]
    return rows[:count]


def _csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, ["context", "text"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({"context": r["context"], "text": r["text"]} for r in rows)
    return out.getvalue().encode()


def _put(key: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "file"
        path.write_bytes(content)
        get_store().put_file(key, path)


def reply_version(
    tenant: Any, name: str, rows: list[dict[str, str]], *, kind: str = "golden",
    domain: str = "",
) -> DatasetVersion:  # fmt: skip
    """A text-generation version of ``rows`` (context, text) stored as an upload stores it;
    ``tenant`` None: a shared set of ``domain``."""
    dataset, _ = Dataset.objects.get_or_create(
        tenant=tenant, name=name,
        defaults={"kind": kind, "task": Task.TEXT_GENERATION, "domain": domain},
    )  # fmt: skip
    content = _csv(rows)
    sha = hashlib.sha256(content).hexdigest()
    key = f"datasets/{tenant.slug if tenant else 'shared'}/{dataset.pk}/{sha}"
    _put(key, content)
    return DatasetVersion.objects.create(
        dataset=dataset, number=dataset.versions.count() + 1, sha256=sha,
        size_bytes=len(content), storage_key=key, format="csv", text_column="text",
        label_column="context", rows=len(rows), labels={}, duplicate_texts=0, preview=[],
    )  # fmt: skip


# --- tiny completers, through the contract's interface -------------------------------------


def completer_dir(folder: Path, rows: list[dict[str, str]], *, steps: int) -> Path:
    """A tiny GPT-2 artifact directory: ``steps`` full-batch steps on ``rows`` (0: random),
    its tokenizer learnt on them."""
    import torch

    from worker import autocomplete as ac

    special = {"pad": "<|pad|>", "context": "<|context|>", "reply": "<|reply|>",
               "end": "<|end|>"}  # fmt: skip
    texts = [r["context"] for r in rows] + [r["text"] for r in rows]
    tokenizer = ac.train_tokenizer(texts * 2, vocab_size=400)
    meta = {
        "format": "workbench-autocomplete", "version": 1, "base_model": "tiny-gpt2",
        "max_context_tokens": 32, "max_length": 64, "special_tokens": special,
        "stop": {"sentence_ends": [".", "?", "!"], "end_token": "<|end|>"},
        "vocab_size": tokenizer.get_vocab_size(),
    }  # fmt: skip
    torch.manual_seed(0)
    config = ac.gpt2_config(tokenizer.get_vocab_size(), n_layer=2, n_embd=64, n_head=2,
                            n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)  # fmt: skip
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config)
    if steps:
        ids = {role: tokenizer.token_to_id(token) for role, token in special.items()}

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False).ids)

        # The contract's layout: <|context|> ctx <|reply|> reply <|end|>, loss on the reply.
        sequences = []
        for row in rows:
            head = [ids["context"], *encode(row["context"].strip())[-32:], ids["reply"]]
            reply = [*encode(row["text"]), ids["end"]]
            sequences.append((head + reply, [-100] * len(head) + reply))
        width = max(len(s) for s, _ in sequences)
        inputs = torch.tensor([s + [ids["pad"]] * (width - len(s)) for s, _ in sequences])
        labels = torch.tensor([t + [-100] * (width - len(t)) for _, t in sequences])
        mask = (
            torch.arange(width)[None, :] < torch.tensor([len(s) for s, _ in sequences])[:, None]
        ).long()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            model(input_ids=inputs, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    ac.write_completer_dir(folder, model, tokenizer, meta)
    return folder


@pytest.fixture(scope="module")
def packed_models(tmp_path_factory: Any) -> dict[str, tuple[Path, str, int]]:
    """{"memorised", "random"}: (model.tar, sha256, size) of each tiny completer."""
    root = tmp_path_factory.mktemp("completers")
    golden = sgd_rows("test", GOLDEN_REPLIES)
    found = {}
    with one_torch_thread():
        for name, steps in (("memorised", 40), ("random", 0)):
            folder = completer_dir(root / name / "model", golden, steps=steps)
            sha, size = pack_dir(folder, root / name / "model.tar")
            found[name] = (root / name / "model.tar", sha, size)
    return found


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core host: a second torch thread only contends (ten times
    slower under load), as the other autocomplete tests find."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def autocomplete_version(
    tenant: Any, packed: tuple[Path, str, int], trained_on: DatasetVersion, *,
    name: str = "replies", trainer: Any = None,
) -> ModelVersion:  # fmt: skip
    """An autocomplete model version trained (as far as the registry knows) on
    ``trained_on``: the run that would have produced it, finished."""
    tar, sha, size = packed
    run = TrainingRun.objects.create(
        tenant=tenant, dataset_version=trained_on, model_name=name,
        base_model=base_models.TINY_GPT2, params={}, status="succeeded", created_by=trainer,
    )  # fmt: skip
    key = f"models/{tenant.slug}/{run.pk}/model.tar"
    get_store().put_file(key, tar)
    version = model_version_create(
        run=run, artifact_key=key, sha256=sha, size_bytes=size, memory_bytes=size,
        predictions_key="", labels=[], metrics={}, format="full",
    )  # fmt: skip
    assert version.registered_model.kind == ModelKind.AUTOCOMPLETE
    return version


@pytest.fixture
def no_dispatch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The evaluation tasks the services would send; this test runs them itself."""
    sent: list[str] = []
    monkeypatch.setattr(services, "_send", sent.append)
    monkeypatch.setattr(services, "_enqueue_promotion_checks", lambda: None)
    return sent


# --- evaluation ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_autocomplete_version_is_evaluated_beside_the_trigram_on_its_golden_reply_sets(
    scientist, reviewer, tenant, artifacts_dir, tmp_path, settings, no_dispatch, packed_models
):
    settings.TRAINING_WORK_DIR = tmp_path / "work"
    golden = reply_version(tenant, "replies-golden", sgd_rows("test", GOLDEN_REPLIES))
    train = reply_version(tenant, "replies-train", sgd_rows("train", TRAIN_REPLIES),
                          kind="training")  # fmt: skip
    make_training_version(reviewer, name="intents-golden", kind="golden")  # a classifier's
    shared = reply_version(None, "banking-replies-golden", sgd_rows("test", 3), domain="banking")
    version = autocomplete_version(tenant, packed_models["memorised"], train)

    response = scientist.api("post", f"{API}/evaluations/", {"model_version": version.pk})
    assert response.status_code == 202, response.content
    queued = {e["dataset_version"]: e["id"] for e in response.json()["evaluations"]}
    assert set(queued) == {golden.pk, shared.pk} and sorted(no_dispatch) == sorted(queued.values())
    for evaluation_id in queued.values():
        with one_torch_thread():
            outcome = run_evaluation(evaluation_id)
        assert outcome == "succeeded", Evaluation.objects.get(pk=evaluation_id).error

    own = Evaluation.objects.get(pk=queued[golden.pk])
    metrics, base = own.metrics, own.base_metrics
    assert metrics["task"] == "text-generation" and own.attempt == 1 and own.claimed_by
    assert metrics["replies"] == GOLDEN_REPLIES and metrics["base_model"] == "tiny-gpt2"
    # Every word boundary after a reply's first word.
    expected = sum(len(words(r["text"])) - 1 for r in sgd_rows("test", GOLDEN_REPLIES))
    assert metrics["positions"] == expected
    assert metrics["perplexity"] > 1.0 and metrics["latency_ms_per_token_p50"] > 0
    # The trigram of the version's training replies, measured on the same replies.
    assert base["base_model"] == "trigram" and base["perplexity"] is None
    assert base["trained_on"] == train.pk and base["trained_replies"] == TRAIN_REPLIES
    assert base["positions"] == metrics["positions"] and base["replies"] == metrics["replies"]
    # The memorised replies: the version completes them far better than the trigram.
    assert metrics["next_word_top1"] > 0.8 > base["next_word_top1"]
    assert metrics["keystrokes_saved"] > base["keystrokes_saved"]
    assert metrics["exact_match"] > base["exact_match"]
    # The held-out completions of the tenant's own set: the review page's and the warm-up's.
    assert len(own.samples) == GOLDEN_REPLIES
    first = own.samples[0]
    assert set(first) == {"prefix", "context", "completion", "reference", "matched", "max_tokens"}
    row = sgd_rows("test", 1)[0]
    assert row["text"].startswith(first["prefix"]) and first["context"] == row["context"]
    matched = sum(s["matched"] for s in own.samples)
    assert matched == round(metrics["exact_match"] * GOLDEN_REPLIES)
    event = AuditEvent.objects.get(verb="evaluation.succeeded", object_id=own.pk)
    assert event.after is not None and event.after["next_word_top1"] == metrics["next_word_top1"]
    # A shared golden set is measured all the same, none of its replies kept.
    on_shared = Evaluation.objects.get(pk=queued[shared.pk])
    assert on_shared.metrics["replies"] == 3 and on_shared.samples == []
    assert on_shared.base_metrics["next_word_top1"] is not None

    # REST: the autocomplete block carries the figures, the trigram's and the samples.
    body = scientist.api("get", f"{API}/evaluations/{own.pk}/").json()
    block = body["autocomplete"]
    assert body["retrieval"] is None and block["base_trained_on"] == train.pk
    assert block["metrics"]["next_word_top1"] == metrics["next_word_top1"]
    assert block["base"]["perplexity"] is None
    assert block["base"]["keystrokes_saved"] == base["keystrokes_saved"]
    assert block["samples"] == own.samples
    assert scientist.api("get", f"{API}/evaluations/{on_shared.pk}/").json()["autocomplete"][
        "samples"] == []  # fmt: skip


@pytest.mark.django_db
def test_an_autocomplete_model_is_evaluated_on_reply_corpora_only(
    scientist, reviewer, tenant, artifacts_dir, no_dispatch, packed_models
):
    train = reply_version(tenant, "replies-train", sgd_rows("train", 10), kind="training")
    version = autocomplete_version(tenant, packed_models["random"], train)
    intents = make_training_version(reviewer, name="intents-golden", kind="golden")
    none_yet = scientist.api("post", f"{API}/evaluations/", {"model_version": version.pk})
    assert none_yet.status_code == 400
    assert "golden or sample reply" in none_yet.json()["error"]["message"]
    response = scientist.api(
        "post", f"{API}/evaluations/", {"model_version": version.pk, "dataset_versions": [intents]}
    )
    assert response.status_code == 400
    assert "text-generation" in response.json()["error"]["fields"]["dataset_versions"][0]
    assert not Evaluation.objects.exists() and no_dispatch == []


def test_another_kinds_evaluation_has_no_autocomplete_block():
    from apps.evaluation.api import _autocomplete

    assert _autocomplete(Evaluation(metrics={"macro_f1": 0.9})) is None
    block = _autocomplete(Evaluation(metrics={"task": "text-generation", "replies": 3}))
    assert block is not None and block["base"] is None and block["samples"] == []


# --- gates ---------------------------------------------------------------------------------

OURS = {"next_word_top1": 0.55, "next_word_top3": 0.7, "exact_match": 0.2,
        "keystrokes_saved": 0.25, "perplexity": 6.0, "latency_ms_per_token_p50": 4.0,
        "latency_ms_per_token_p95": 9.0, "replies": 8, "positions": 80}  # fmt: skip
TRIGRAM = {**OURS, "next_word_top1": 0.45, "keystrokes_saved": 0.08, "perplexity": None,
           "latency_ms_per_token_p50": 0.03, "latency_ms_per_token_p95": 0.1}  # fmt: skip


def test_autocomplete_gates_floors_budget_and_no_regression_against_the_trigram():
    gates = services.default_gates(ModelKind.AUTOCOMPLETE)
    assert gates == [
        {"metric": "next_word_top1", "op": ">=", "value": 0.35, "dataset": None},
        {"metric": "keystrokes_saved", "op": ">=", "value": 0.10, "dataset": None},
        {"metric": "latency_ms_per_token_p50", "op": "<=", "value": 50.0, "dataset": None},
    ]
    regression = services.regression_metrics(ModelKind.AUTOCOMPLETE)
    assert regression == ("next_word_top1",)
    results = {"ds": {"dataset_name": "replies", **OURS}}
    per_token = services.latency_budget_metric(ModelKind.AUTOCOMPLETE)
    rows = check_gates(gates=gates, results=results, max_regression=0.0,
                       champion={"ds": TRIGRAM}, regression_metrics=regression,
                       champion_names={"ds": "trigram"}, latency_budget_ms=8.0,
                       latency_metric=per_token)  # fmt: skip
    by = {(r["gate"], r["metric"]): r for r in rows}
    assert by[("regression vs trigram", "next_word_top1")]["passed"]
    assert by[("regression vs trigram", "next_word_top1")]["champion_value"] == 0.45
    # The budget bounds the per-token p95: 9 ms > 8 ms.
    assert not by[("latency budget", "latency_ms_per_token_p95")]["passed"]
    assert [k for k, r in by.items() if not r["passed"]] == [
        ("latency budget", "latency_ms_per_token_p95")]  # fmt: skip
    # Lower is better for perplexity: a gate says so with its op.
    worse = {"ds": {**OURS, "next_word_top1": 0.40, "perplexity": 40.0}}
    rows = check_gates(gates=[*gates, {"metric": "perplexity", "op": "<=", "value": 20.0}],
                       results=worse, max_regression=0.0, champion={"ds": TRIGRAM},
                       regression_metrics=regression)  # fmt: skip
    assert {(r["gate"], r["metric"]) for r in rows if not r["passed"]} == {
        ("policy", "perplexity"), ("regression vs champion", "next_word_top1")}  # fmt: skip


@pytest.mark.django_db
def test_the_autocomplete_policy_has_defaults_and_its_gates_name_what_it_measures(
    viewer, admin, tenant
):
    body = viewer.api("get", f"{API}/policies/autocomplete/").json()
    assert body["gates"] == services.default_gates(ModelKind.AUTOCOMPLETE)
    assert body["max_regression_vs_champion"] == 0.0
    for metric in ("macro_f1", "recall_at_1", "latency_ms_p95"):
        wrong = admin.api("put", f"{API}/policies/autocomplete/",
                          {"gates": [{"metric": metric, "op": ">=", "value": 0.5}]})  # fmt: skip
        assert wrong.status_code == 400, metric
        assert f"not measured on {metric}" in str(wrong.json()["error"]["fields"]["gates"])
    # Another kind's policy does not take an autocomplete figure either.
    gate = {"metric": "next_word_top1", "op": ">=", "value": 0.5}
    wrong = admin.api("put", f"{API}/policies/classifier/", {"gates": [gate]})
    assert wrong.status_code == 400
    assert not PromotionPolicy.objects.filter(tenant=tenant).exists()
    change = {"gates": [{"metric": "perplexity", "op": "<=", "value": 30},
                        {"metric": "next_word_top3", "op": ">=", "value": 0.5}],
              "latency_budget_ms": 20}  # fmt: skip
    response = admin.api("put", f"{API}/policies/autocomplete/", change)
    assert response.status_code == 200, response.content
    assert [g["metric"] for g in response.json()["gates"]] == ["perplexity", "next_word_top3"]
    # The dashboard's form offers the autocomplete figures only, scores between 0 and 1.
    client = Client()
    client.force_login(admin.user)
    form = client.get("/t/acme/policies/?kind=autocomplete").content.decode()
    assert "Edit the autocomplete policy" in form and 'action="?kind=autocomplete"' in form
    assert '<option value="keystrokes_saved"' in form and '<option value="macro_f1"' not in form
    data = {
        "gates-TOTAL_FORMS": "1", "gates-INITIAL_FORMS": "0", "gates-MIN_NUM_FORMS": "0",
        "gates-MAX_NUM_FORMS": "5", "gates-0-metric": "keystrokes_saved", "gates-0-op": ">=",
        "gates-0-value": "1.5", "gates-0-dataset": "", "max_regression_vs_champion": "0",
    }  # fmt: skip
    too_high = client.post("/t/acme/policies/?kind=autocomplete", data)
    assert too_high.status_code == 400 and "between 0 and 1" in too_high.content.decode()


def finish(evaluation_ids: list[str], *, ours: dict[str, Any], base: dict[str, Any]) -> None:
    Evaluation.objects.filter(pk__in=evaluation_ids).update(
        status=EvalStatus.SUCCEEDED,
        metrics={"task": "text-generation", **ours},
        base_metrics={"task": "text-generation", **base, "base_model": "trigram"},
        samples=[{"prefix": "Please confirm: <b>transfer</b>", "context": "Send $5 to Ann.",
                  "completion": " $5 to Ann.", "reference": " $5 to Ann.", "matched": True,
                  "max_tokens": 16},
                 {"prefix": "Your transfer", "context": "", "completion": " is complete.",
                  "reference": " was sent.", "matched": False, "max_tokens": 16}],
    )  # fmt: skip


@pytest.mark.django_db
def test_a_promotion_is_held_to_the_trigram_without_a_champion_and_the_review_page_shows_it(
    scientist, reviewer, tenant, artifacts_dir, no_dispatch, packed_models
):
    reply_version(tenant, "replies-golden", sgd_rows("test", 4))
    train = reply_version(tenant, "replies-train", sgd_rows("train", 10), kind="training")
    first = autocomplete_version(tenant, packed_models["random"], train)
    request = promotions.promotion_request(actor=scientist.user, tenant=tenant,
                                           model_version=first, target="staging")  # fmt: skip
    (evaluation_id,) = request.evaluation_ids
    finish(request.evaluation_ids, ours={**OURS, "next_word_top1": 0.40}, base=TRIGRAM)
    checked = promotions.promotion_check(promotion_id=request.pk)
    assert checked is not None and checked.status == "gates_failed"
    assert [(r["gate"], r["metric"]) for r in checked.gate_results if not r["passed"]] == [
        ("regression vs trigram", "next_word_top1")  # 0.40 above the floor, below 0.45
    ]
    client = Client()
    client.force_login(reviewer.user)
    page = client.get(f"/t/acme/reviews/{request.pk}/").content.decode()
    assert f'id="autocomplete-metrics-{evaluation_id}"' in page
    assert 'data-metric="keystrokes_saved"' in page and "word trigram" in page
    assert "0.25" in page and "0.08" in page  # ours and the trigram's keystrokes saved
    assert "regression vs trigram" in page
    # The completions: customer text escaped, never markup.
    assert f'id="completions-{evaluation_id}"' in page
    assert "Please confirm: &lt;b&gt;transfer&lt;/b&gt;" in page
    assert 'data-matched="true"' in page and 'data-matched="false"' in page
    assert "is complete." in page and "was sent." in page

    # With a version in production, the regression check is against it, not the trigram.
    ModelVersion.objects.filter(pk=first.pk).update(stage=Stage.PRODUCTION)
    Evaluation.objects.filter(pk=evaluation_id).update(
        metrics={"task": "text-generation", **OURS, "next_word_top1": 0.60}
    )
    second = autocomplete_version(tenant, packed_models["memorised"], train)
    again = promotions.promotion_request(actor=scientist.user, tenant=tenant,
                                         model_version=second, target="staging")  # fmt: skip
    finish(again.evaluation_ids, ours=OURS, base=TRIGRAM)
    checked = promotions.promotion_check(promotion_id=again.pk)
    assert checked is not None and checked.champion_id == first.pk
    against = [r for r in checked.gate_results if r["gate"].startswith("regression")]
    assert [(r["gate"], r["passed"], r["champion_value"]) for r in against] == [
        ("regression vs champion", False, 0.60)]  # fmt: skip
    page = client.get(f"/t/acme/reviews/{again.pk}/").content.decode()
    assert "0.6" in page  # the champion's column


@pytest.mark.django_db(transaction=True)
@pytest.mark.celery_worker
def test_a_promotion_of_an_autocomplete_version_is_evaluated_on_a_real_worker_and_gated(
    celery_worker_process, scientist, reviewer, tenant, settings, packed_models
):
    from tests.training_helpers import wait_for

    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    golden = reply_version(tenant, "replies-golden", sgd_rows("test", GOLDEN_REPLIES))
    train = reply_version(tenant, "replies-train", sgd_rows("train", TRAIN_REPLIES),
                          kind="training")  # fmt: skip
    version = autocomplete_version(tenant, packed_models["memorised"], train)
    response = scientist.api(
        "post", f"{API}/promotions/", {"model_version": version.pk, "target": "staging"}
    )
    assert response.status_code == 202, response.content
    promotion_id = response.json()["id"]

    def decided() -> str | None:
        status = scientist.api("get", f"{API}/promotions/{promotion_id}/").json()["status"]
        return status if status != "checking" else None

    # The worker claims the evaluation, measures the version and the trigram, finishes it
    # and checks the waiting promotion against the default autocomplete policy.
    status = wait_for(decided, timeout=240)
    body = scientist.api("get", f"{API}/promotions/{promotion_id}/").json()
    assert status in ("awaiting_approval", "gates_failed"), body
    (evaluation_id,) = body["evaluation_ids"]
    evaluation = Evaluation.objects.get(pk=evaluation_id)
    assert evaluation.dataset_version_id == golden.pk and evaluation.attempt == 1
    assert evaluation.base_metrics["trained_on"] == train.pk
    gates = {(r["gate"], r["metric"]) for r in body["gate_results"]}
    assert gates == {
        ("policy", "next_word_top1"), ("policy", "keystrokes_saved"),
        ("policy", "latency_ms_per_token_p50"), ("regression vs trigram", "next_word_top1"),
    }  # fmt: skip
    # The memorised replies clear every quality gate and the trigram. The latency budget
    # (50 ms a token, p50) is met on a quiet machine but not on a crowded test host: the
    # decision follows it either way.
    quality = [r for r in body["gate_results"] if r["metric"] != "latency_ms_per_token_p50"]
    assert all(r["passed"] for r in quality), body["gate_results"]
    (latency,) = [r for r in body["gate_results"] if r["metric"] == "latency_ms_per_token_p50"]
    assert latency["value"] == evaluation.metrics["latency_ms_per_token_p50"]
    assert status == ("awaiting_approval" if latency["passed"] else "gates_failed")
    client = Client()
    client.force_login(reviewer.user)
    page = client.get(f"/t/acme/reviews/{promotion_id}/").content.decode()
    assert f'id="autocomplete-metrics-{evaluation_id}"' in page
    assert f'id="completions-{evaluation_id}"' in page
    assert page.count('class="completion-sample"') == GOLDEN_REPLIES
