"""The autocomplete training loop: :func:`train_autocomplete`, the reply-completion
counterpart of :func:`worker.training.loop.train` (same arguments, callbacks and result).

A run trains a tiny GPT-2 (:mod:`worker.autocomplete`) on a reply corpus: each reply a
sequence ``<|context|> message <|reply|> reply <|end|>`` with the loss on the reply and its
end only (the next-token cross-entropy, per token). From scratch, the byte-level BPE is
learnt on the run's training text (contexts and replies) first; with ``init_from``
"pretrained" the causal LM at ``WORKBENCH_CAUSAL_LM_PATH`` and its tokenizer are the start,
the four special tokens added to both.

Validation, at each epoch end, on held-out replies (whole distinct reply texts,
:func:`worker.reply_data.split_replies`, unless a validation file is given):

- ``val_loss``: the mean negative log-likelihood per reply token (the end included), and
  ``val_perplexity`` = exp(val_loss);
- ``val_next_word_top1``: at each word boundary of the first held-out replies (at most
  :data:`NEXT_WORD_POSITIONS` positions), whether the greedy completion of the reply so far
  (context given) predicts the reply's next word — positions and the predicted word as
  :mod:`worker.autocomplete_eval` reads them: the evaluation's measure, on a capped sample.

The best epoch is the lowest ``val_loss`` (lower is better) and early stopping watches it.
At the end the best model (the artifact directory) completes a few held-out prefixes for the
run page (:attr:`TrainResult.samples`).

Everything else is the classifier loop's: the reporting thread, the optimizer, schedule and
mixed precision (:class:`~worker.training.loop.Optimization`, autocast on CUDA only),
seeding and deterministic kernels, checkpoints (the model directory in a checkpoint is an
autocomplete model directory), bit-identical resumes on CPU, cancel.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from worker import autocomplete, autocomplete_eval, autocomplete_text, base_models
from worker.reply_data import Reply, read_replies, split_replies
from worker.training import checkpoint
from worker.training.checkpoint import LoopState
from worker.training.config import DataSpec, TrainConfig
from worker.training.data import DataError
from worker.training.loop import (
    RESUME_MUST_MATCH,
    Optimization,
    StopReason,
    TrainResult,
    _Cancelled,
    deterministic_algorithms,
    seed_everything,
)
from worker.training.reporting import Background, Callbacks, Reporter

logger = logging.getLogger(__name__)

MONITOR = "val_loss"  # lower is better
EPOCH_METRICS = ("val_loss", "val_perplexity", "val_next_word_top1")
# Next-word positions validated per epoch: enough to tell epochs apart (a point is ~2.5 % of
# accuracy at 400), few enough that validating costs seconds on a CPU.
NEXT_WORD_POSITIONS = 400
NEXT_WORD_BATCH = 64
SAMPLES = 8  # held-out prefixes completed for the run page
AUTOCOMPLETE_RESUME_MUST_MATCH = (*RESUME_MUST_MATCH, "init_from")


def train_autocomplete(
    config: TrainConfig,
    train_data: DataSpec,
    *,
    validation_data: DataSpec | None,
    work_dir: Path,
    callbacks: Callbacks,
    resume_dir: Path | None = None,
) -> TrainResult:
    """Train an autocomplete model of ``config.base_model`` on ``train_data``'s replies
    (``label_column`` names the context column, "" for none); return the best epoch's model.

    ``validation_data``: replies to validate on; None holds out ``validation_split`` of the
    distinct replies. Raises as :func:`worker.training.loop.train` does.
    """
    errors = config.validate()
    if errors:
        raise ValueError(f"invalid training config: {errors}")
    if not config.is_autocomplete():
        raise ValueError(f"{config.base_model!r} is not an autocomplete base model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work_dir.mkdir(parents=True, exist_ok=True)
    logger.info("training an autocomplete model on %s: %s", device, config.to_dict())
    with (
        deterministic_algorithms(enabled=device == "cpu"),
        Background(callbacks.on_reporting_thread_exit) as background,
    ):
        return _train(
            config, train_data, validation_data, work_dir, callbacks, resume_dir, device, background
        )


def _data_digest(replies: list[Reply]) -> str:
    """What a resume must train on: the training replies and their contexts, hashed."""
    content = json.dumps([[r.context, r.text] for r in replies])
    return hashlib.sha256(content.encode()).hexdigest()


def build(config: TrainConfig, replies: list[Reply]) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """A fresh model, its tokenizer and meta for ``replies`` (torch's RNG: seed it first)."""
    if config.resolved_init_from() == "pretrained":
        return _pretrained(config)
    texts = [text for r in replies for text in (r.context, r.text) if text.strip()]
    tokenizer = autocomplete.train_tokenizer(texts, vocab_size=base_models.TINY_GPT2_VOCAB_SIZE)
    meta = autocomplete.new_meta(
        tokenizer, base_model=config.base_model, max_length=config.max_length
    )
    model = autocomplete.build_model(autocomplete.gpt2_config(tokenizer.get_vocab_size()))
    return model, tokenizer, meta


def _pretrained(config: TrainConfig) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """The installed causal LM with the special tokens added to its vocabulary."""
    from transformers import GPT2LMHeadModel

    path = base_models.causal_lm_path()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_special_tokens(list(autocomplete.SPECIAL.values()))
    model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True, use_safetensors=None)
    model.resize_token_embeddings(tokenizer.get_vocab_size())
    ids = {role: tokenizer.token_to_id(token) for role, token in autocomplete.SPECIAL.items()}
    model.config.pad_token_id = ids["pad"]
    model.config.bos_token_id = model.config.eos_token_id = ids["end"]
    meta = autocomplete.new_meta(
        tokenizer, base_model=config.base_model, max_length=config.max_length
    )
    meta["init_from"] = "pretrained"
    if config.max_length > model.config.n_positions:
        raise DataError(
            f"max_length {config.max_length} exceeds the pretrained model's "
            f"{model.config.n_positions} positions"
        )
    return model, tokenizer, meta


def _train(
    config: TrainConfig,
    train_data: DataSpec,
    validation_data: DataSpec | None,
    work_dir: Path,
    callbacks: Callbacks,
    resume_dir: Path | None,
    device: str,
    background: Background,
) -> TrainResult:
    reporter = Reporter(callbacks, config, background)
    saved = checkpoint.read_state(resume_dir) if resume_dir is not None else None
    reporter.phase("loading", LoopState(**saved["loop"]) if saved is not None else LoopState())
    seed_everything(config.seed)

    # -- data: the training replies and the held-out ones -------------------------------------
    replies = read_replies(train_data)
    if validation_data is not None:
        train_replies, val_replies = replies, read_replies(validation_data)
    else:
        train_replies, val_replies = split_replies(replies, config.validation_split, config.seed)
    digest = _data_digest(train_replies)

    # -- model: built fresh, or loaded from the checkpoint ------------------------------------
    best_dir = work_dir / "model"
    if resume_dir is None:
        shutil.rmtree(best_dir, ignore_errors=True)
        model, tokenizer, meta = build(config, train_replies)
    else:
        assert saved is not None  # read above, for the first report
        _check_resumable(saved, config, digest)
        model, tokenizer, meta = autocomplete.load_training_dir(resume_dir / "model")
        shutil.rmtree(best_dir, ignore_errors=True)
        if (resume_dir / "best").is_dir():
            checkpoint.copy_tree(resume_dir / "best", best_dir)
    model.to(device)
    special = autocomplete.special_ids(tokenizer, meta)
    pad_id = special["pad"]

    def encoded(rows: list[Reply]) -> list[tuple[list[int], list[int]]]:
        return [
            autocomplete.encode_reply(tokenizer, r.text, r.context, meta=meta, ids=special)
            for r in rows
        ]

    train_sequences = encoded(train_replies)
    val_sequences = encoded(val_replies)
    positions = next_word_positions(val_replies, NEXT_WORD_POSITIONS)
    # The live model decoded as serving decodes it (the Completer shares its weights).
    completer = autocomplete.Completer(model, tokenizer, meta, device=device)
    model.train()

    # -- optimizer, schedule, mixed precision ------------------------------------------------
    steps_per_epoch = math.ceil(len(train_sequences) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimization, state = Optimization.start(model, config, device, total_steps, saved)
    resumed_from_step = state.step if saved is not None else None
    reporter.total_steps = total_steps
    schedule = checkpoint.Schedule(config.checkpoint_every_steps, config.checkpoint_min_seconds)
    snapshot = _Snapshot(model, tokenizer, meta)

    def save_checkpoint() -> None:
        reporter.flush_losses(state)
        background.drain()  # one checkpoint in flight
        step = state.step
        save_model = snapshot.take()
        building = checkpoint.stage(work_dir, step=step, best_dir=best_dir)
        training_state = checkpoint.detached_copy(
            {
                "loop": asdict(state),
                **optimization.state_dict(),
                "rng": checkpoint.rng_state(),
                "config": config.to_dict(),
                "data_sha256": digest,
            }
        )

        def write_and_hand_over() -> None:
            written = checkpoint.complete(
                work_dir, building, save_model=save_model, state=training_state
            )
            callbacks.on_checkpoint(written, step)

        background.submit(
            f"the checkpoint at step {step}", write_and_hand_over, skip_when_stopping=True
        )
        schedule.written()

    def validate() -> dict[str, float]:
        nll, tokens = _sequence_loss(
            model, val_sequences, pad_id, device, optimization, config, callbacks
        )
        val_loss = nll / max(tokens, 1)
        model.train(False)
        top1 = next_word_top1(completer, positions, should_stop=callbacks.should_stop)
        model.train()
        return {
            "val_loss": val_loss,
            # exp of a loss above ~700 overflows a float; such a model is noise anyway.
            "val_perplexity": math.exp(min(val_loss, 700.0)),
            "val_next_word_top1": top1,
        }

    try:
        while state.epoch < config.epochs and not state.stop_reason:
            epoch = state.epoch + 1
            order = torch.randperm(
                len(train_sequences),
                generator=torch.Generator().manual_seed(config.seed * 1000 + epoch),
            ).tolist()
            model.train()
            reporter.phase("training", state)
            # A mid-epoch resume skips the batches this epoch already trained on.
            for batch_index in range(state.step_in_epoch, steps_per_epoch):
                if callbacks.should_stop():
                    raise _Cancelled
                background.check()
                rows = order[
                    batch_index * config.batch_size : (batch_index + 1) * config.batch_size
                ]
                input_ids, mask, labels = collate([train_sequences[i] for i in rows], pad_id)
                with optimization.autocast():
                    logits = model(
                        input_ids=input_ids.to(device), attention_mask=mask.to(device)
                    ).logits
                loss = _next_token_loss(logits, labels.to(device), reduction="mean")
                optimization.step(loss, model)
                state.step += 1
                state.step_in_epoch += 1
                reporter.step_done(state, loss.detach(), len(rows))
                if state.step_in_epoch < steps_per_epoch and schedule.due(state.step):
                    save_checkpoint()

            # -- epoch end: validate, keep the best, decide on early stopping, checkpoint ----
            reporter.flush_losses(state)
            reporter.phase("validating", state)
            metrics = validate()
            metrics["train_loss"] = state.epoch_loss_sum / max(state.epoch_loss_steps, 1)
            reporter.epoch_metrics(state, epoch, metrics, names=EPOCH_METRICS)
            state.epoch, state.step_in_epoch = epoch, 0
            state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
            reporter.phase("saving", state)
            if state.best_epoch == 0 or metrics[MONITOR] < state.best_metric:
                # best_metric holds the best val_loss here (lower is better).
                state.best_metric, state.best_epoch = metrics[MONITOR], epoch
                state.best_metrics = metrics
                state.epochs_without_improvement = 0
                _save_best(best_dir, model, tokenizer, meta)
            else:
                state.epochs_without_improvement += 1
                if config.patience and state.epochs_without_improvement >= config.patience:
                    state.stop_reason = "early_stopping"
                    state.stop_detail = (
                        f"{MONITOR} did not improve for {state.epochs_without_improvement} "
                        f"epochs (best {state.best_metric:.4f} at epoch {state.best_epoch})"
                    )
            save_checkpoint()
    except _Cancelled:
        background.stopping = True
        reporter.flush_metrics()
        background.drain()
        return _result(
            "cancelled",
            f"cancelled at step {state.step} (epoch {state.epoch + 1})",
            state,
            best_dir,
            [],
            resumed_from_step,
            device,
            train_replies,
            val_replies,
        )

    # -- done: the saved best model completes held-out prefixes, as serving will -------------
    reporter.phase("saving", state)
    samples = completion_samples(
        autocomplete.load_completer(best_dir, device=device), val_replies, SAMPLES
    )
    reporter.flush_metrics()
    background.drain()
    stop_reason: StopReason = "early_stopping" if state.stop_reason else "completed"
    return _result(
        stop_reason,
        state.stop_detail
        or f"completed {state.epoch} epochs (best {MONITOR} {state.best_metric:.4f} "
        f"at epoch {state.best_epoch})",
        state,
        best_dir,
        samples,
        resumed_from_step,
        device,
        train_replies,
        val_replies,
    )


def collate(
    sequences: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on padding) of a batch."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in sequences])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in sequences])
    lengths = torch.tensor([len(ids) for ids, _ in sequences])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return input_ids, mask, labels


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str) -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token, on labelled ones."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


@torch.no_grad()
def _sequence_loss(
    model: Any,
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    device: str,
    optimization: Optimization,
    config: TrainConfig,
    callbacks: Callbacks,
) -> tuple[float, int]:
    """(summed next-token NLL, labelled tokens) over ``sequences``, in eval mode."""
    model.train(False)
    total, tokens = 0.0, 0
    size = max(config.batch_size, 32)
    for start in range(0, len(sequences), size):
        if callbacks.should_stop():
            raise _Cancelled
        input_ids, mask, labels = collate(sequences[start : start + size], pad_id)
        with optimization.autocast():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        labels = labels.to(device)
        total += float(_next_token_loss(logits, labels, reduction="sum"))
        tokens += int((labels[:, 1:] != -100).sum())
    return total, tokens


def next_word_positions(replies: list[Reply], cap: int) -> list[tuple[str, str, str]]:
    """(prefix, context, next word) at each word boundary after the first word of
    ``replies``, in order, at most ``cap``: the reply so far and the word typed next."""
    out: list[tuple[str, str, str]] = []
    for reply in replies:
        for prefix, word in autocomplete_eval.boundary_prefixes(reply.text):
            out.append((prefix, reply.context, word))
            if len(out) >= cap:
                return out
    return out


def next_word_top1(
    completer: autocomplete.Completer,
    positions: list[tuple[str, str, str]],
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> float:
    """Share of ``positions`` whose greedy completion's first word is the next word."""
    if not positions:
        return 0.0
    hits = 0
    for start in range(0, len(positions), NEXT_WORD_BATCH):
        if should_stop():
            raise _Cancelled
        chunk = positions[start : start + NEXT_WORD_BATCH]
        completions = completer.complete_batch(
            [(prefix, context) for prefix, context, _ in chunk], stop_at_word=True
        )
        # The evaluation's own reading of a completion (none when it carries on the typed
        # word), so a run's val_next_word_top1 and its version's next_word_top1 agree.
        hits += sum(
            autocomplete_eval.predicted_next_word(prefix, c.text) == word
            for c, (prefix, _, word) in zip(completions, chunk, strict=True)
        )
    return hits / len(positions)


def completion_samples(
    completer: autocomplete.Completer, replies: list[Reply], count: int
) -> list[dict[str, Any]]:
    """Greedy completions of the first half of ``count`` distinct held-out replies (of three
    words or more): {"context", "prefix", "completion", "reference", "next_word",
    "matched"} each, "matched" when the completion's first word is the reply's next."""
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for reply in replies:
        spans = autocomplete_text.word_spans(reply.text)
        if reply.text in seen or len(spans) < 3:
            continue
        seen.add(reply.text)
        cut = len(spans) // 2
        prefix = reply.text[: spans[cut][0]].rstrip()
        [completion] = completer.complete(prefix, reply.context)
        next_word = autocomplete_text.words(reply.text)[cut]
        samples.append(
            {
                "context": reply.context,
                "prefix": prefix,
                "completion": completion.text,
                "reference": reply.text[len(prefix) :],
                "next_word": next_word,
                "matched": autocomplete_text.first_word(completion.text) == next_word,
                "score": completion.score,
            }
        )
        if len(samples) == count:
            break
    return samples


class _Snapshot:
    """A CPU copy of the weights taken between steps, for the reporting thread to write."""

    def __init__(self, model: Any, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.copy: Any = None

    def take(self) -> Callable[[Path], None]:
        if self.copy is None:
            self.copy = copy.deepcopy(self.model).to("cpu")
        self.copy.load_state_dict(self.model.state_dict())
        model, tokenizer, meta = self.copy, self.tokenizer, dict(self.meta)
        return lambda d: autocomplete.write_completer_dir(d, model, tokenizer, meta)


def _save_best(best_dir: Path, model: Any, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    # Written beside and swapped in: the old files may be hard-linked into a checkpoint.
    building = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(building, ignore_errors=True)
    autocomplete.write_completer_dir(building, model, tokenizer, meta)
    shutil.rmtree(best_dir, ignore_errors=True)
    building.rename(best_dir)


def _result(
    stop_reason: StopReason,
    detail: str,
    state: LoopState,
    best_dir: Path,
    samples: list[dict[str, Any]],
    resumed_from_step: int | None,
    device: str,
    train_replies: list[Reply],
    val_replies: list[Reply],
) -> TrainResult:
    return TrainResult(
        stop_reason=stop_reason,
        stop_detail=detail,
        best_epoch=state.best_epoch,
        metrics=dict(state.best_metrics),
        model_dir=best_dir,
        # The sample completions are this run's validation predictions (the version's
        # predictions file) and what the run page shows.
        validation_predictions=samples,
        steps=state.step,
        resumed_from_step=resumed_from_step,
        device=device,
        labels=[],
        train_rows=len(train_replies),
        validation_rows=len(val_replies),
        samples=samples,
    )


def _check_resumable(saved: dict[str, Any], config: TrainConfig, digest: str) -> None:
    before = saved["config"]
    changed = [
        name for name in AUTOCOMPLETE_RESUME_MUST_MATCH if before.get(name) != getattr(config, name)
    ]
    if changed:
        raise ValueError(f"cannot resume: the checkpoint's run had other {', '.join(changed)}")
    if saved.get("data_sha256") != digest:
        raise ValueError("cannot resume: the training replies differ")


__all__ = [
    "EPOCH_METRICS",
    "MONITOR",
    "collate",
    "completion_samples",
    "next_word_positions",
    "next_word_top1",
    "train_autocomplete",
]
