"""The training loop: one function, :func:`train`, for fresh starts and resumes alike.

In the manner of nanoGPT's ``train.py``: the loop reads top to bottom; a resume loads the
model, optimizer, scheduler, RNG and loop state from a checkpoint and then runs exactly the
code a fresh start runs, from the step it stopped at. Validation runs at each epoch end and
keeps the best epoch's model; early stopping watches val_macro_f1.

Determinism (CPU): python, numpy and torch are seeded; the validation split is a function of
the rows and the seed; each epoch's order comes from a ``torch.Generator`` seeded with
(seed, epoch), so a resume recomputes it instead of storing it; deterministic algorithms are
switched on for the duration of the run. Same seed, same data, same metrics.

Off the training thread: metric points and checkpoints go to the reporting thread
(:class:`~worker.training.reporting.Background`). A checkpoint is a snapshot taken between
steps (the weights into a CPU copy of the model, the optimizer state copied to the CPU),
which the reporting thread writes and hands to ``on_checkpoint`` while training goes on.
One checkpoint is in flight at a time, and the loop returns only once the reporting thread
is done: nothing is lost, and its first failure fails the run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker import adapters, base_models
from worker.inference import load_classifier
from worker.modeling import collate, encode, load_model_dir, save_model_dir
from worker.training import base, checkpoint
from worker.training.checkpoint import LoopState
from worker.training.config import DataSpec, TrainConfig
from worker.training.data import DataError, Example, read_examples, split_validation
from worker.training.metrics import accuracy, macro_f1
from worker.training.reporting import (
    Background,
    Callbacks,
    MetricPoint,
    Phase,
    Progress,
    Reporter,
    ReportingError,
)

# These live in reporting; the loop's callers find them here. The embedding and autocomplete
# loops share the optimizer, schedule and mixed precision (Optimization), seeding and
# determinism.
__all__ = [
    "Callbacks",
    "LinearWarmupDecay",
    "MetricPoint",
    "Optimization",
    "Phase",
    "Progress",
    "ReportingError",
    "TrainResult",
    "deterministic_algorithms",
    "make_optimizer",
    "seed_everything",
    "train",
]

logger = logging.getLogger(__name__)

StopReason = Literal["completed", "early_stopping", "cancelled"]

# A resume must see the run it continues: these decide the data order, model and schedule.
RESUME_MUST_MATCH = (
    "base_model",
    "epochs",
    "batch_size",
    "max_length",
    "seed",
    "warmup_ratio",
    *base_models.LORA_PARAMS,
)


@dataclass
class TrainResult:
    stop_reason: StopReason
    stop_detail: str
    best_epoch: int  # 0 when cancelled before the first validation
    # Of the best epoch: val_accuracy, val_macro_f1, val_loss, train_loss. val_loss is absent
    # when no validation row has a label seen in training.
    metrics: dict[str, float]
    # The best epoch's model directory. When cancelled: the best model so far, and the
    # directory does not exist if no epoch had finished.
    model_dir: Path
    # One {"text", "label", "predicted", "score"} per validation row, by the saved best model;
    # empty when cancelled (cancel returns promptly rather than predict).
    validation_predictions: list[dict[str, Any]]
    steps: int
    resumed_from_step: int | None
    device: str
    labels: list[str] = field(default_factory=list)
    train_rows: int = 0
    validation_rows: int = 0
    # An autocomplete run's held-out prefixes with the best model's greedy completions
    # (worker.training.autocomplete_loop.completion_samples), for the run page.
    samples: list[dict[str, Any]] = field(default_factory=list)


class _Cancelled(Exception):
    pass


def train(
    config: TrainConfig,
    train_data: DataSpec,
    *,
    validation_data: DataSpec | None,
    work_dir: Path,
    callbacks: Callbacks,
    resume_dir: Path | None = None,
) -> TrainResult:
    """Train ``config.base_model`` on ``train_data``; return the best epoch's model.

    ``work_dir`` receives ``checkpoint/`` (see :mod:`worker.training.checkpoint`) and
    ``model/`` (the best model). With ``resume_dir`` (a checkpoint directory) the run
    continues from that checkpoint's step. Raises ``ValueError`` for a bad config, a
    :class:`DataError` for unusable data, a :class:`ReportingError` (caused by the original)
    when ``on_metrics`` or ``on_checkpoint`` raised; other exceptions from callbacks
    propagate.
    """
    errors = config.validate()
    if errors:
        raise ValueError(f"invalid training config: {errors}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work_dir.mkdir(parents=True, exist_ok=True)
    logger.info("training on %s: %s", device, config.to_dict())
    with (
        deterministic_algorithms(enabled=device == "cpu"),
        Background(callbacks.on_reporting_thread_exit) as background,
    ):
        return _train(
            config, train_data, validation_data, work_dir, callbacks, resume_dir, device, background
        )


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
    # Even this first report carries the checkpoint's step: a resume never shows step 0.
    reporter.phase("loading", LoopState(**saved["loop"]) if saved is not None else LoopState())
    seed_everything(config.seed)

    # -- data ---------------------------------------------------------------------------------
    train_examples = read_examples(train_data)
    if validation_data is not None:
        val_examples = read_examples(validation_data)
    else:
        train_examples, val_examples = split_validation(
            train_examples, config.validation_split, config.seed
        )
    labels = sorted({example.label for example in train_examples})
    if len(labels) < 2:
        raise DataError("the training data needs at least two labels")

    # -- model: built fresh, or loaded from the checkpoint ------------------------------------
    best_dir = work_dir / "model"
    if resume_dir is None:
        shutil.rmtree(best_dir, ignore_errors=True)
        model, tokenizer = base.build(
            config.base_model,
            texts=[example.text for example in train_examples],
            labels=labels,
            max_length=config.max_length,
            lora=config.lora() if _is_adapter(config) else None,
        )
    else:
        assert saved is not None  # read above, for the first report
        _check_resumable(saved, config, labels)
        model, tokenizer, _ = load_model_dir(resume_dir / "model")
        shutil.rmtree(best_dir, ignore_errors=True)
        if (resume_dir / "best").is_dir():
            checkpoint.copy_tree(resume_dir / "best", best_dir)
    model.to(device)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    label_ids = {label: index for index, label in enumerate(labels)}
    train_ids = encode(tokenizer, [e.text for e in train_examples], config.max_length)
    train_y = [label_ids[e.label] for e in train_examples]
    val_ids = encode(tokenizer, [e.text for e in val_examples], config.max_length)

    # -- optimizer, schedule, mixed precision ------------------------------------------------
    steps_per_epoch = math.ceil(len(train_ids) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimization, state = Optimization.start(model, config, device, total_steps, saved)
    amp_dtype = optimization.amp_dtype
    resumed_from_step = state.step if saved is not None else None
    reporter.total_steps = total_steps

    snapshots = _Snapshots(model, tokenizer, labels, work_dir, best_dir)
    schedule = checkpoint.Schedule(config.checkpoint_every_steps, config.checkpoint_min_seconds)

    def save_checkpoint() -> None:
        reporter.flush_losses(state)
        # One checkpoint in flight: the snapshot's copies are free again, memory is bounded.
        background.drain()
        step = state.step
        write = snapshots.take(
            step,
            {
                "loop": asdict(state),
                **optimization.state_dict(),
                "rng": checkpoint.rng_state(),
                "config": config.to_dict(),
                "labels": labels,
            },
        )

        def write_and_hand_over() -> None:
            callbacks.on_checkpoint(write(), step)

        background.submit(
            f"the checkpoint at step {step}", write_and_hand_over, skip_when_stopping=True
        )
        schedule.written()

    try:
        while state.epoch < config.epochs and not state.stop_reason:
            epoch = state.epoch + 1
            order = torch.randperm(
                len(train_ids), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)
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
                batch = {
                    k: v.to(device)
                    for k, v in collate([train_ids[i] for i in rows], pad_id).items()
                }
                targets = torch.tensor([train_y[i] for i in rows], device=device)
                with optimization.autocast():
                    logits = model(**batch).logits
                loss = F.cross_entropy(logits.float(), targets)
                optimization.step(loss, model)
                state.step += 1
                state.step_in_epoch += 1

                reporter.step_done(state, loss.detach(), len(rows))
                # An epoch's last step is checkpointed after its validation, below.
                if state.step_in_epoch < steps_per_epoch and schedule.due(state.step):
                    save_checkpoint()

            # -- epoch end: validate, keep the best, decide on early stopping, checkpoint ----
            reporter.flush_losses(state)
            reporter.phase("validating", state)
            metrics = _evaluate(
                model, val_ids, val_examples, labels, pad_id, device, amp_dtype, config, callbacks
            )
            metrics["train_loss"] = state.epoch_loss_sum / max(state.epoch_loss_steps, 1)
            reporter.epoch_metrics(state, epoch, metrics)
            state.epoch, state.step_in_epoch = epoch, 0
            state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
            reporter.phase("saving", state)
            if metrics["val_macro_f1"] > state.best_metric:
                state.best_metric, state.best_epoch = metrics["val_macro_f1"], epoch
                state.best_metrics = metrics
                state.epochs_without_improvement = 0
                _save_best(best_dir, model, tokenizer, labels)
            else:
                state.epochs_without_improvement += 1
                if config.patience and state.epochs_without_improvement >= config.patience:
                    state.stop_reason = "early_stopping"
                    state.stop_detail = (
                        f"val_macro_f1 did not improve for {state.epochs_without_improvement} "
                        f"epochs (best {state.best_metric:.4f} at epoch {state.best_epoch})"
                    )
            save_checkpoint()
    except _Cancelled:
        # Promptly: a checkpoint not yet written is dropped, nobody resumes a cancelled run.
        background.stopping = True
        reporter.flush_metrics()
        background.drain()
        return TrainResult(
            stop_reason="cancelled",
            stop_detail=f"cancelled at step {state.step} (epoch {state.epoch + 1})",
            best_epoch=state.best_epoch,
            metrics=dict(state.best_metrics),
            model_dir=best_dir,
            validation_predictions=[],
            steps=state.step,
            resumed_from_step=resumed_from_step,
            device=device,
            labels=labels,
            train_rows=len(train_examples),
            validation_rows=len(val_examples),
        )

    # -- done: predict the validation rows with the saved best model, as serving will --------
    reporter.phase("saving", state)
    classifier = load_classifier(best_dir, device=device)
    predictions = classifier.predict([e.text for e in val_examples])
    reporter.flush_metrics()
    background.drain()  # the last checkpoint and metric points are in before the run ends
    stop_reason: StopReason = "early_stopping" if state.stop_reason else "completed"
    return TrainResult(
        stop_reason=stop_reason,
        stop_detail=state.stop_detail
        or f"completed {state.epoch} epochs (best val_macro_f1 {state.best_metric:.4f} "
        f"at epoch {state.best_epoch})",
        best_epoch=state.best_epoch,
        metrics=dict(state.best_metrics),
        model_dir=best_dir,
        validation_predictions=[
            {"text": e.text, "label": e.label, "predicted": p["label"], "score": p["score"]}
            for e, p in zip(val_examples, predictions, strict=True)
        ],
        steps=state.step,
        resumed_from_step=resumed_from_step,
        device=device,
        labels=labels,
        train_rows=len(train_examples),
        validation_rows=len(val_examples),
    )


class _Snapshots:
    """Consistent copies of the training state, taken between steps on the training thread.

    The weights go into a second model on the CPU (made once, at the first checkpoint, by
    copying the live one: a GPU model is briefly held twice on the GPU), the rest into CPU
    tensor copies. Writing them out is left to the function :meth:`take` returns, which the
    reporting thread runs while the live model trains on; the next ``take`` must wait for it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        work_dir: Path,
        best_dir: Path,
    ) -> None:
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        self.work_dir, self.best_dir = work_dir, best_dir
        self.copy: PreTrainedModel | None = None

    def take(self, step: int, training_state: dict[str, Any]) -> Callable[[], Path]:
        save_model = self._copy_model()
        building = checkpoint.stage(self.work_dir, step=step, best_dir=self.best_dir)
        state = checkpoint.detached_copy(training_state)

        def write() -> Path:
            return checkpoint.complete(self.work_dir, building, save_model=save_model, state=state)

        return write

    def _copy_model(self) -> Callable[[Path], None]:
        """Copy the weights now; return what writes the copy into a model directory."""
        labels = list(self.labels)
        if isinstance(self.model, adapters.AdapterClassifier):
            # Only what the tenant adds: the shared base is not trained, nor copied.
            meta = self.model.meta(labels)
            tensors = {
                name: tensor.detach().to("cpu", copy=True)
                for name, tensor in self.model.adapter_tensors().items()
            }
            return lambda d: adapters.write_adapter_dir(
                d, meta=meta, tensors=tensors, labels=labels
            )
        if self.copy is None:
            self.copy = copy.deepcopy(self.model).to("cpu")  # type: ignore[arg-type]
        self.copy.load_state_dict(self.model.state_dict())
        model, tokenizer = self.copy, self.tokenizer
        return lambda d: save_model_dir(d, model=model, tokenizer=tokenizer, labels=labels)


@torch.no_grad()
def _evaluate(
    model: PreTrainedModel,
    ids: list[list[int]],
    examples: list[Example],
    labels: list[str],
    pad_id: int,
    device: str,
    amp_dtype: torch.dtype | None,
    config: TrainConfig,
    callbacks: Callbacks,
) -> dict[str, float]:
    """Validation metrics; rows whose label the model never saw count as wrong answers."""
    model.train(False)
    label_ids = {label: index for index, label in enumerate(labels)}
    predicted: list[str] = []
    loss_sum, loss_rows = 0.0, 0
    for start in range(0, len(ids), config.batch_size):
        if callbacks.should_stop():
            raise _Cancelled
        batch = {
            k: v.to(device)
            for k, v in collate(ids[start : start + config.batch_size], pad_id).items()
        }
        with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(**batch).logits.float()
        predicted += [labels[i] for i in logits.argmax(dim=-1).tolist()]
        targets = torch.tensor(
            [label_ids.get(e.label, -100) for e in examples[start : start + config.batch_size]],
            device=device,
        )
        known = int((targets >= 0).sum())
        if known:
            loss_sum += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            loss_rows += known
    model.train()
    truth = [e.label for e in examples]
    metrics = {
        "val_accuracy": accuracy(truth, predicted),
        "val_macro_f1": macro_f1(truth, predicted),
    }
    if loss_rows:
        metrics["val_loss"] = loss_sum / loss_rows
    return metrics


def _save_best(
    best_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, labels: list[str]
) -> None:
    # Written beside and swapped in: the old files may be hard-linked into a checkpoint, so
    # they must never be overwritten in place.
    building = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(building, ignore_errors=True)
    save_model_dir(building, model=model, tokenizer=tokenizer, labels=labels)
    shutil.rmtree(best_dir, ignore_errors=True)
    building.rename(best_dir)


@dataclass
class Optimization:
    """A run's optimizer, LR schedule and mixed precision: one recipe for every loop
    (classifier, embedding, autocomplete), made fresh or restored from a checkpoint."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    # bfloat16 needs no loss scaling; float16 (older GPUs) does. The CPU runs in float32.
    amp_dtype: torch.dtype | None
    device: str
    grad_clip: float

    @classmethod
    def start(
        cls,
        model: torch.nn.Module,
        config: TrainConfig,
        device: str,
        total_steps: int,
        saved: dict[str, Any] | None,
    ) -> tuple[Optimization, LoopState]:
        """AdamW with linear warm-up and decay over ``total_steps``, autocast on CUDA only;
        with ``saved`` (a checkpoint's state) the optimizer, schedule, scaler, RNG and
        loop state it holds, else a fresh loop state."""
        optimizer = make_optimizer(model, config, device)
        warmup_steps = round(total_steps * config.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, LinearWarmupDecay(warmup_steps, total_steps)
        )
        amp_dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None
        if device == "cuda" and amp_dtype is None:
            amp_dtype = torch.float16
        scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
        state = LoopState()
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
            state = LoopState(**saved["loop"])
            checkpoint.set_rng_state(saved["rng"])
        optimization = cls(optimizer, scheduler, scaler, amp_dtype, device, config.grad_clip)
        return optimization, state

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def step(self, loss: torch.Tensor, model: torch.nn.Module) -> None:
        """Backward (scaled for float16), clip, step the optimizer and the schedule."""
        scaled_loss: torch.Tensor = self.scaler.scale(loss)
        torch.autograd.backward(scaled_loss)
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (``start`` reads it back)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: str
) -> torch.optim.Optimizer:
    # The usual BERT recipe: no weight decay on biases and LayerNorm weights.
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_norm_or_bias = parameter.ndim < 2 or "LayerNorm" in name
            (no_decay if is_norm_or_bias else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused kernels on CUDA; on the CPU the multi-tensor path, a few ops per step rather
    # than a few per parameter.
    fused = device == "cuda"
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused, foreach=not fused)


class LinearWarmupDecay:
    """LR factor: linear warm-up to 1, then linear decay towards 0 at the last step."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        remaining = self.total_steps - step
        return max(0.0, remaining / max(1, self.total_steps - self.warmup_steps))


def _is_adapter(config: TrainConfig) -> bool:
    return base_models.get(config.base_model).format == base_models.FORMAT_ADAPTER


def _check_resumable(saved: dict[str, Any], config: TrainConfig, labels: list[str]) -> None:
    before = saved["config"]
    changed = [name for name in RESUME_MUST_MATCH if before.get(name) != getattr(config, name)]
    if changed:
        raise ValueError(f"cannot resume: the checkpoint's run had other {', '.join(changed)}")
    if saved["labels"] != labels:
        raise ValueError("cannot resume: the training data's labels differ from the checkpoint's")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


@contextlib.contextmanager
def deterministic_algorithms(*, enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the run, the process's previous setting restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    if enabled:
        # warn_only: an op without a deterministic kernel warns rather than failing a run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # With deterministic algorithms on, torch also fills every new tensor with NaN, a
        # guard against kernels reading memory they never wrote; that cost ~2 % of a tiny
        # model's CPU step, and the results are the same bit for bit without it.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill  # type: ignore[attr-defined]
