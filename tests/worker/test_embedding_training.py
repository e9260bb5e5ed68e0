"""Embedding runs on a stackfaq slice: in-batch negatives without false negatives, validation
recall on held-out queries against every document, checkpoints, a bit-identical resume,
cancel, separate encoders; the saved model ranks as its validation said."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.worker.conftest import Recorder, SimulatedCrash
from worker import base_models, retrieval
from worker.embeddings import base_embedder
from worker.retrieval_data import Document, Pair, read_documents, read_pairs, split_queries
from worker.training.config import DataSpec, TrainConfig
from worker.training.data import DataError
from worker.training.embedding_loop import EPOCH_METRICS, plan_batches, train_embedder
from worker.training.loop import ReportingError, TrainResult

STACKFAQ = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "stackfaq"


def write_stackfaq_slice(directory: Path, documents: int, split: str = "train") -> DataSpec:
    """The first ``documents`` stackfaq documents and their pairs of ``split``."""
    directory.mkdir(parents=True, exist_ok=True)
    with (STACKFAQ / "documents.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:documents]
    kept = {row["id"] for row in rows}
    with (STACKFAQ / f"{split}.csv").open(encoding="utf-8", newline="") as handle:
        pairs = [p for p in csv.DictReader(handle) if p["document_id"] in kept]
    for name, columns, data in (
        ("documents.csv", ["id", "title", "text"], rows),
        ("pairs.csv", ["query", "document_id"], pairs),
    ):
        with (directory / name).open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(data)
    return DataSpec(
        path=directory / "pairs.csv",
        text_column="query",
        label_column="document_id",
        documents_path=directory / "documents.csv",
    )


def embed_config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "base_model": base_models.MINILM_L6_EMBED,
        "epochs": 2,
        "learning_rate": 1e-3,
        "batch_size": 16,
        "max_length": 24,
        "validation_split": 0.25,
        "lora_r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.0,
        "lora_target_modules": ["query", "value"],
        "checkpoint_every_steps": 3,
        "checkpoint_min_seconds": 0,
        "seed": 5,
    }
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def faq_slice(tmp_path_factory: pytest.TempPathFactory) -> DataSpec:
    """8 documents, their 56 training pairs (42 to train on: 6 steps an epoch)."""
    return write_stackfaq_slice(tmp_path_factory.mktemp("stackfaq"), documents=8)


@pytest.fixture(scope="module")
def trained(
    faq_slice: DataSpec, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, Recorder]:
    recorder = Recorder()
    result = train_embedder(
        embed_config(),
        faq_slice,
        validation_data=None,
        work_dir=tmp_path_factory.mktemp("run"),
        callbacks=recorder,
    )
    return result, recorder


def test_batches_never_hold_two_pairs_of_one_document() -> None:
    documents = [i % 5 for i in range(40)]  # 5 documents, 8 pairs each
    order = list(reversed(range(40)))
    batches = plan_batches(order, documents, batch_size=4)
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(len(b) <= 4 and len({documents[i] for i in b}) == len(b) for b in batches)
    assert sum(len(b) == 4 for b in batches) >= 9  # dealt, not one pair a batch
    # A pair left alone (its document's fourth, here) has no negatives: not a step.
    assert plan_batches([0, 1, 2, 3], [0, 0, 1, 0], batch_size=4) == [[0, 2]]


def test_queries_are_held_out_whole(faq_slice: DataSpec) -> None:
    pairs = read_pairs(faq_slice)
    train, validation = split_queries(pairs, 0.25, seed=5)
    assert {p.query for p in train}.isdisjoint({p.query for p in validation})
    assert len(train) + len(validation) == len(pairs)
    assert split_queries(pairs, 0.25, seed=5) == (train, validation)


def test_a_run_reports_retrieval_metrics_and_saves_an_embedder(
    trained: tuple[TrainResult, Recorder],
) -> None:
    result, recorder = trained
    assert result.stop_reason == "completed" and result.labels == []
    assert sorted(p.name for p in result.model_dir.iterdir()) == [
        "embedder.json",
        "query.safetensors",
    ]
    assert set(EPOCH_METRICS) <= set(result.metrics)
    for name in EPOCH_METRICS:
        assert len(recorder.values(name)) == 2  # one point per epoch
    assert recorder.values("train_loss")
    assert recorder.checkpoints and result.steps == recorder.checkpoints[-1][1]
    # The saved model, through the serving code, ranks the validation queries as the loop's
    # last validation of the best epoch did.
    ranks = [p["rank"] for p in result.validation_predictions]
    assert len(ranks) == len({p["query"] for p in result.validation_predictions})
    recall_at_1 = sum(r == 1 for r in ranks) / len(ranks)
    assert recall_at_1 == pytest.approx(result.metrics["val_recall_at_1"])


def test_tuning_beats_the_base_on_the_held_out_queries(
    trained: tuple[TrainResult, Recorder], faq_slice: DataSpec
) -> None:
    result, _ = trained
    assert faq_slice.documents_path is not None
    documents = read_documents(faq_slice.documents_path, "csv")
    queries = [p["query"] for p in result.validation_predictions]
    relevant = [set(p["document_ids"]) for p in result.validation_predictions]
    base = base_embedder(max_length=24)
    ranked = retrieval.search(
        base.encode(queries), base.encode_documents(documents), [d.id for d in documents], 10
    )
    before = retrieval.metrics([r.ids for r in ranked], relevant)
    assert result.metrics["val_mrr_at_10"] >= before["mrr_at_10"]


def test_resume_of_an_embedding_run_is_bit_identical(
    trained: tuple[TrainResult, Recorder], faq_slice: DataSpec, tmp_path: Path
) -> None:
    uninterrupted, _ = trained
    crashing = Recorder(crash_at_checkpoint=1)  # mid-epoch: step 3 of 6
    with pytest.raises(ReportingError) as crash:
        train_embedder(
            embed_config(),
            faq_slice,
            validation_data=None,
            work_dir=tmp_path / "crashed",
            callbacks=crashing,
        )
    assert isinstance(crash.value.__cause__, SimulatedCrash)
    checkpoint_dir, step = crashing.checkpoints[-1]
    assert step == 3
    resumed = train_embedder(
        embed_config(),
        faq_slice,
        validation_data=None,
        work_dir=tmp_path / "resumed",
        callbacks=Recorder(),
        resume_dir=checkpoint_dir,
    )
    assert resumed.resumed_from_step == 3
    assert resumed.metrics == uninterrupted.metrics
    assert resumed.validation_predictions == uninterrupted.validation_predictions
    whole = load_file(uninterrupted.model_dir / "query.safetensors")
    again = load_file(resumed.model_dir / "query.safetensors")
    assert all(torch.equal(whole[name], again[name]) for name in whole)
    with pytest.raises(ValueError, match="lora_r"):
        train_embedder(
            embed_config(lora_r=8),
            faq_slice,
            validation_data=None,
            work_dir=tmp_path / "other",
            callbacks=Recorder(),
            resume_dir=checkpoint_dir,
        )


def test_separate_encoders_store_two_and_cancel_stops_promptly(tmp_path: Path) -> None:
    tiny = write_stackfaq_slice(tmp_path / "data", documents=5)
    # Past the first epoch's 5 steps and 2 validation batches, inside the second epoch.
    recorder = Recorder(stop_after_steps=8)
    result = train_embedder(
        embed_config(separate_encoders=True, checkpoint_every_steps=100),
        tiny,
        validation_data=None,
        work_dir=tmp_path / "run",
        callbacks=recorder,
    )
    assert result.stop_reason == "cancelled"
    assert "(epoch 2)" in result.stop_detail
    assert result.best_epoch == 1 and result.validation_predictions == []
    assert sorted(p.name for p in result.model_dir.iterdir()) == [
        "document.safetensors",
        "embedder.json",
        "query.safetensors",
    ]


def test_a_pair_for_a_missing_document_is_a_data_error(tmp_path: Path) -> None:
    spec = write_stackfaq_slice(tmp_path, documents=3)
    with spec.path.open("a", encoding="utf-8") as handle:
        handle.write("where is it?,faq999\n")
    with pytest.raises(DataError, match="faq999"):
        train_embedder(
            embed_config(),
            spec,
            validation_data=None,
            work_dir=tmp_path / "w",
            callbacks=Recorder(),
        )
    no_documents = DataSpec(path=spec.path, text_column="query", label_column="document_id")
    with pytest.raises(DataError, match="documents"):
        train_embedder(
            embed_config(),
            no_documents,
            validation_data=None,
            work_dir=tmp_path / "w",
            callbacks=Recorder(),
        )
    assert Document("a", "t") == Document(id="a", text="t", title="")
    assert Pair("q", "a").document_id == "a"


def test_early_stopping_when_mrr_stops_improving(tmp_path: Path) -> None:
    tiny = write_stackfaq_slice(tmp_path / "data", documents=5)
    # Validated on other queries (stackfaq's test pairs), against the training documents.
    test_pairs = write_stackfaq_slice(tmp_path / "test", documents=5, split="test")
    validation = DataSpec(path=test_pairs.path, text_column="query", label_column="document_id")
    # A learning rate too small to change a ranking: epoch 2 cannot beat epoch 1.
    recorder = Recorder()
    result = train_embedder(
        embed_config(epochs=3, learning_rate=1e-12, patience=1, checkpoint_every_steps=100),
        tiny,
        validation_data=validation,
        work_dir=tmp_path / "run",
        callbacks=recorder,
    )
    assert result.validation_rows == len(read_pairs(validation))
    assert result.train_rows == len(read_pairs(tiny))  # nothing held out
    assert result.stop_reason == "early_stopping"
    assert result.best_epoch == 1 and "val_mrr_at_10 did not improve" in result.stop_detail
    assert recorder.values("epoch") == [1.0, 2.0]  # the third epoch never ran
