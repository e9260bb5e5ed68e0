"""Autocomplete runs on a few dozen banks_1 replies (a 2-layer, 64-wide GPT-2, sequences of at
most 48 tokens): the epoch metrics, the saved model and its sample completions, a
bit-identical resume, early stopping on val_loss, cancel, and a start from a pretrained
causal LM."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.worker.conftest import Recorder, SimulatedCrash
from worker import autocomplete, base_models
from worker.reply_data import read_replies, split_replies
from worker.training.autocomplete_loop import EPOCH_METRICS, train_autocomplete
from worker.training.config import DataSpec, TrainConfig
from worker.training.loop import ReportingError, TrainResult

SGD = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "sgd-replies" / "banks_1"


@pytest.fixture(scope="module", autouse=True)
def tiny_shape() -> Iterator[None]:
    """A smaller GPT-2 than the catalogue's, on one torch thread (the shared 2-core machine
    ran two threads 20x slower)."""
    saved, threads = dict(base_models.TINY_GPT2_SHAPE), torch.get_num_threads()
    base_models.TINY_GPT2_SHAPE.update(n_layer=2, n_embd=64, n_head=2, n_positions=64)
    torch.set_num_threads(1)
    yield
    base_models.TINY_GPT2_SHAPE.clear()
    base_models.TINY_GPT2_SHAPE.update(saved)
    torch.set_num_threads(threads)


def write_replies(path: Path, count: int, split: str = "train", *, skip: int = 0) -> DataSpec:
    with (SGD / f"{split}.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[skip : skip + count]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["context", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return DataSpec(path=path, text_column="text", label_column="context")


def small_config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        **base_models.get(base_models.TINY_GPT2).defaults(),
        "base_model": base_models.TINY_GPT2,
        "epochs": 2,
        "batch_size": 8,
        "max_length": 48,
        "learning_rate": 3e-3,
        "validation_split": 0.2,
        "patience": None,
        "checkpoint_every_steps": 1000,
        "checkpoint_min_seconds": 0,
        "log_every_steps": 1,
        "seed": 3,
    }
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def replies(tmp_path_factory: pytest.TempPathFactory) -> DataSpec:
    return write_replies(tmp_path_factory.mktemp("replies") / "replies.csv", 40)


@pytest.fixture(scope="module")
def trained(
    replies: DataSpec, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, Recorder]:
    recorder = Recorder()
    result = train_autocomplete(
        small_config(checkpoint_every_steps=2),
        replies,
        validation_data=None,
        work_dir=tmp_path_factory.mktemp("run"),
        callbacks=recorder,
    )
    return result, recorder


def test_a_run_reports_its_metrics_and_saves_an_autocomplete_model(
    trained: tuple[TrainResult, Recorder], replies: DataSpec
) -> None:
    result, recorder = trained
    train, held_out = split_replies(read_replies(replies), 0.2, 3)
    assert (result.train_rows, result.validation_rows) == (len(train), len(held_out))
    assert result.stop_reason == "completed" and result.steps == 2 * math.ceil(len(train) / 8)
    for name in (*EPOCH_METRICS, "train_loss"):
        assert len(recorder.values(name)) >= 2, name
    losses, perplexities = recorder.values("val_loss"), recorder.values("val_perplexity")
    assert perplexities == pytest.approx([math.exp(v) for v in losses])
    assert all(0.0 <= v <= 1.0 for v in recorder.values("val_next_word_top1"))
    assert losses[1] < losses[0]  # it learns
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert set(result.metrics) == {*EPOCH_METRICS, "train_loss"}

    # The best model is an autocomplete artifact directory, with its tokenizer and stops.
    assert sorted(p.name for p in result.model_dir.iterdir()) == sorted(autocomplete.ARTIFACT_FILES)
    meta = autocomplete.read_meta(result.model_dir)
    assert meta["base_model"] == "tiny-gpt2" and meta["max_length"] == 48
    completer = autocomplete.load_completer(result.model_dir)
    assert completer.model.config.n_layer == 2

    # Sample completions of held-out prefixes, by the saved model, for the run page.
    assert result.samples and result.validation_predictions == result.samples
    texts = {r.text for r in held_out}
    for sample in result.samples:
        assert sample["prefix"] + sample["reference"] in texts
        [again] = completer.complete(sample["prefix"], sample["context"])
        assert sample["completion"] == again.text
        assert isinstance(sample["matched"], bool) and sample["next_word"]
    # Checkpoints every 2 steps and at each epoch end.
    assert [step for _, step in recorder.checkpoints][:2] == [2, 4]


def test_resume_is_bit_identical(
    trained: tuple[TrainResult, Recorder], replies: DataSpec, tmp_path: Path
) -> None:
    uninterrupted, _ = trained
    crashing = Recorder(crash_at_checkpoint=2)  # mid-epoch 1: step 4
    with pytest.raises(ReportingError) as crash:
        train_autocomplete(
            small_config(checkpoint_every_steps=2),
            replies,
            validation_data=None,
            work_dir=tmp_path / "crashed",
            callbacks=crashing,
        )
    assert isinstance(crash.value.__cause__, SimulatedCrash)
    checkpoint_dir, step = crashing.checkpoints[-1]
    assert step == 4 and autocomplete.is_completer_dir(checkpoint_dir / "model")
    resumed = train_autocomplete(
        small_config(checkpoint_every_steps=2),
        replies,
        validation_data=None,
        work_dir=tmp_path / "resumed",
        callbacks=Recorder(),
        resume_dir=checkpoint_dir,
    )
    assert resumed.resumed_from_step == 4 and resumed.steps == uninterrupted.steps
    assert resumed.metrics == uninterrupted.metrics
    assert resumed.samples == uninterrupted.samples
    whole = load_file(uninterrupted.model_dir / "model.safetensors")
    again = load_file(resumed.model_dir / "model.safetensors")
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[name], again[name]) for name in whole)
    assert (uninterrupted.model_dir / "tokenizer.json").read_text() == (
        resumed.model_dir / "tokenizer.json"
    ).read_text()

    # Another run's checkpoint is refused: other parameters, other replies.
    with pytest.raises(ValueError, match="max_length"):
        train_autocomplete(
            small_config(checkpoint_every_steps=2, max_length=40),
            replies,
            validation_data=None,
            work_dir=tmp_path / "other",
            callbacks=Recorder(),
            resume_dir=checkpoint_dir,
        )
    fewer = write_replies(tmp_path / "fewer.csv", 30)
    with pytest.raises(ValueError, match="training replies differ"):
        train_autocomplete(
            small_config(checkpoint_every_steps=2),
            fewer,
            validation_data=None,
            work_dir=tmp_path / "other",
            callbacks=Recorder(),
            resume_dir=checkpoint_dir,
        )


def test_early_stopping_when_val_loss_stops_improving(tmp_path: Path) -> None:
    train = write_replies(tmp_path / "train.csv", 16)
    validation = write_replies(tmp_path / "val.csv", 8, split="val")
    # A learning rate too small to move a float32 weight: epoch 2 cannot beat epoch 1.
    recorder = Recorder()
    result = train_autocomplete(
        small_config(epochs=4, learning_rate=1e-12, patience=1),
        train,
        validation_data=validation,
        work_dir=tmp_path / "run",
        callbacks=recorder,
    )
    assert result.stop_reason == "early_stopping"
    assert result.best_epoch == 1 and "val_loss did not improve" in result.stop_detail
    assert recorder.values("epoch") == [1.0, 2.0]  # the third epoch never ran
    assert (result.train_rows, result.validation_rows) == (16, 8)  # nothing held out


def test_cancel_stops_promptly_and_a_classifier_base_is_refused(
    replies: DataSpec, tmp_path: Path
) -> None:
    recorder = Recorder(stop_after_steps=2)
    result = train_autocomplete(
        small_config(epochs=3),
        replies,
        validation_data=None,
        work_dir=tmp_path / "run",
        callbacks=recorder,
    )
    assert result.stop_reason == "cancelled" and "(epoch 1)" in result.stop_detail
    assert result.steps == 2 and result.samples == [] and result.best_epoch == 0
    assert not result.model_dir.exists()
    with pytest.raises(ValueError, match="not an autocomplete base model"):
        train_autocomplete(
            TrainConfig(base_model="tiny-bert"),
            replies,
            validation_data=None,
            work_dir=tmp_path / "bert",
            callbacks=Recorder(),
        )
    with pytest.raises(ValueError, match="init_from"):
        train_autocomplete(
            small_config(init_from="sideways"),
            replies,
            validation_data=None,
            work_dir=tmp_path / "bad",
            callbacks=Recorder(),
        )


def test_a_run_can_start_from_a_pretrained_causal_lm(
    replies: DataSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import GPT2LMHeadModel

    config = small_config(epochs=1, init_from="pretrained")
    # None installed: refused up front, naming the variable.
    monkeypatch.delenv(base_models.CAUSAL_LM_PATH_ENV, raising=False)
    assert base_models.CAUSAL_LM_PATH_ENV in config.validate()["init_from"]

    # A tiny "pretrained" GPT-2 saved as transformers saves one, with its own byte-level
    # tokenizer.json (GPT-2's <|endoftext|>, none of the workbench's special tokens).
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    plain.train_from_iterator(
        [r.text for r in read_replies(replies)],
        trainer=trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    saved = tmp_path / "gpt2"
    torch.manual_seed(11)
    pretrained = GPT2LMHeadModel(
        autocomplete.gpt2_config(plain.get_vocab_size(), bos_token_id=0, eos_token_id=0)
    )
    pretrained.save_pretrained(saved)
    (saved / "tokenizer.json").write_text(plain.to_str())
    monkeypatch.setenv(base_models.CAUSAL_LM_PATH_ENV, str(saved))
    assert config.validate() == {}

    result = train_autocomplete(
        small_config(epochs=1, init_from="pretrained", learning_rate=1e-12),
        replies,
        validation_data=None,
        work_dir=tmp_path / "run",
        callbacks=Recorder(),
    )
    meta = autocomplete.read_meta(result.model_dir)
    assert meta["init_from"] == "pretrained"
    completer = autocomplete.load_completer(result.model_dir)
    # The special tokens come after the pretrained vocabulary, the embeddings grown to fit.
    assert completer.ids["pad"] == plain.get_vocab_size()
    assert completer.model.config.vocab_size == plain.get_vocab_size() + 4
    # Started from the saved weights (a learning rate too small to move them).
    start = pretrained.state_dict()
    for name, tensor in completer.model.state_dict().items():
        if name.startswith("transformer.h."):
            assert torch.allclose(tensor, start[name], rtol=0.0, atol=1e-9), name
    assert completer.complete("Which acc", "What is my balance?")[0].tokens > 0
