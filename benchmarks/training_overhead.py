"""Training throughput: the workbench's training task against a bare torch loop.

    .venv/bin/python benchmarks/training_overhead.py            # full: 8,590 rows, ~7 min
    .venv/bin/python benchmarks/training_overhead.py --quick    # CI smoke: 770 rows
    .venv/bin/python benchmarks/training_overhead.py --profile  # + cProfile of the callbacks
    .venv/bin/python benchmarks/training_overhead.py --base-model tiny-gpt2  # autocomplete

With ``--base-model tiny-gpt2`` (issue 15) both sides train the autocomplete model instead:
the project's run is ``worker.training.autocomplete_loop.train_autocomplete`` under the same
runner, on the SGD agent replies of ``../shared/datasets/sgd-replies`` (the five services'
train.csv, context and reply, the first ``--per-label`` (300) of each), uploaded as a
text-generation dataset version; the bare loop reads the same replies, holds out the same
validation replies (``reply_data.split_replies``), learns the same BPE and builds the same
GPT-2 (``autocomplete_loop.build``), encodes them the same way (``encode_reply``, loss on
the reply and its end) and steps the same batches with a plain AdamW / schedule / clip.

Both sides train the same model in this one process: by default the tiny BERT of
``worker.base_models`` (WordPiece tokenizer trained on the run's rows by
``worker.training.base.build``); with ``--base-model minilm-l6-lora`` a LoRA adapter and
head on the shared MiniLM with the base's defaults (the bare side steps the same peft
model, frozen base left out of its optimizer as the project does); the same seed, rows,
batch size, max_length, AdamW (same lr, weight decay groups, multi-tensor), LR schedule
and gradient clipping.
Interleaved A B A B:

* A, the project: ``apps.training.runner.execute`` on a real run in a throwaway workbench
  (own ``WORKBENCH_VAR_DIR``: SQLite, local artifact store, MLflow on SQLite), launched
  with ``services.run_launch`` and marked dispatched by ``services.runs_dispatch`` (the two
  Celery enqueues are replaced by no-ops: the task body runs here, in-process). It does
  what the Celery task does: the claim, DB heartbeats with progress (~1/s, heartbeat
  thread), metric rows and MLflow metrics (the loop's reporting thread), MLflow
  params/model, checkpoints packed and put in the artifact store (snapshot on the training
  thread, the rest on the reporting thread; every 50 steps but at least 60 s apart by
  default, so only at the epoch end in a ~20 s epoch), the model version.
* B, the reference: a bare torch loop over the same CSV, built with the same helpers
  (``read_examples``, ``split_validation``, ``base.build``, ``encode``, ``collate``).

Both sides run with one torch intra-op thread (``--threads``). With two threads on a 2-core
machine shared with other sessions, every parallel region waits for a thread a neighbour has
descheduled: the bare loop swung between 35 and 450 samples/s from one rep to the next, and
one thread was faster than two throughout. One thread leaves the second core to the
neighbours and to the run's heartbeat and reporting threads (whose time is reported).

Throughput counts the training phase only, on both sides: from the loop's first step of an
epoch to its last (the project's phase changes come from its ``on_progress`` calls). One-off
work (dataset download, tokenizer training, validation, packaging, MLflow model logging) is
reported separately as fixed costs per run. Callbacks and checkpoint writes are timed by
thin wrappers installed here (a few per second, so they cost nothing measurable); the
``--profile`` run also runs cProfile inside them and prints the top entries.

Four figures:

1. A B, 4 reps (20-25 s of training each): the figure the issue asks for. On a shared
   2-core machine the pairs differ by up to +-20 % from the neighbours alone.
2. Lockstep, 2 runs: a project run in which the bare loop trains the same batch inside the
   project's ``should_stop()`` just before each project step, so both see the same
   neighbours at the same moment; the project's steps are timed between those calls. Far
   less noisy; see ``Lockstep`` for the one correction it needs.
3. Lockstep, 1 run, with ``checkpoint_min_seconds`` 0: a checkpoint every 50 steps as
   before the interval existed, so what the off-thread checkpoints still cost shows.
4. The share of the project's training phase spent on the training thread inside its
   callbacks and checkpoint snapshots, as timed by the wrappers: the part of the overhead
   that can be named. The reporting and heartbeat threads' time is reported beside it.

The full run prepends its table, with machine facts, to ``benchmarks/README.md`` (newest
first); ``--quick`` records only with ``--record``. The temp dir is removed at exit.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import datetime as dt
import functools
import hashlib
import io
import itertools
import math
import os
import platform
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (
    README,
    add_record_flags,
    commit,
    cpu_model,
    gpu,
    launch,
    mem_total_gib,
    record,
)

ROOT = Path(__file__).resolve().parent.parent
BANKING77 = Path(
    os.environ.get(
        "BANKING77_TRAIN_CSV", ROOT.parent / "shared" / "datasets" / "banking77" / "train.csv"
    )
)

SGD_REPLIES = Path(
    os.environ.get("SGD_REPLIES_DIR", ROOT.parent / "shared" / "datasets" / "sgd-replies")
)
SGD_SERVICES = ("banks_1", "hotels_2", "rentalcars_1", "restaurants_1", "services_1")

OVERHEAD_TARGET = 0.05  # project samples/s >= 0.95 x bare loop samples/s
BASE_MODEL = "tiny-bert"
# The settings a run gets through the API with these overrides (epochs; the rest default).
PARAM_OVERRIDES: dict[str, Any] = {"epochs": 1}
# Settings this process must not inherit: the throwaway workbench gets its own var dir.
ENV_DROP = (
    "DATABASE_URL",
    "ARTIFACT_STORE",
    "UPLOAD_TMP_DIR",
    "CELERY_BROKER_URL",
    "PROMETHEUS_MULTIPROC_DIR",
    "WORKBENCH_MODE",
    "TRAINING_WORK_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_ARTIFACT_ROOT",
    "MLFLOW_UI_URL",
)


# --- the data -----------------------------------------------------------------------------


def write_slice(path: Path, per_label: int, offset: int = 0) -> int:
    """A CSV (text,label) of ``per_label`` banking77 rows per label, in file order."""
    by_label: dict[str, list[str]] = defaultdict(list)
    with BANKING77.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            by_label[row["category"]].append(row["text"])
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["text", "label"])
        for label in sorted(by_label):
            for text in by_label[label][offset : offset + per_label]:
                writer.writerow([text, label])
                rows += 1
    return rows


def write_replies(path: Path, per_service: int, offset: int = 0) -> int:
    """A CSV (context,text) of up to ``per_service`` SGD agent replies of each service's
    train.csv, in file order (an autocomplete run's data)."""
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["context", "text"])
        for service in SGD_SERVICES:
            with (SGD_REPLIES / service / "train.csv").open(encoding="utf-8", newline="") as fh:
                replies = [(r["context"], r["text"]) for r in csv.DictReader(fh) if r["text"]]
            for context, text in replies[offset : offset + per_service]:
                writer.writerow([context, text])
                rows += 1
    return rows


def is_autocomplete() -> bool:
    from worker import base_models

    return base_models.get(BASE_MODEL).kind == base_models.KIND_AUTOCOMPLETE


def data_name() -> str:
    return "SGD agent replies" if is_autocomplete() else "banking77 rows"


# --- timing what the project does -----------------------------------------------------------


@dataclass(frozen=True)
class Span:
    name: str
    start: float
    end: float
    main_thread: bool
    cpu: float  # the calling thread's CPU seconds in the call


@dataclass
class Recorder:
    """Wall-clock spans of the wrapped calls and the loop's phase changes, per run."""

    spans: list[Span] = field(default_factory=list)
    phases: list[tuple[float, str]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    # should_stop() runs before each step: (entered, left) -- apart only in lockstep, when
    # a bare-loop step runs inside it.
    step_marks: list[tuple[float, float]] = field(default_factory=list)
    lockstep: Iterator[float] | None = None  # the bare trainer's steps, in lockstep runs
    lockstep_steps: list[float] = field(default_factory=list)
    result: Any = None
    profiler: cProfile.Profile | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        self.spans, self.phases, self.marks, self.result = [], [], {}, None
        self.step_marks, self.lockstep_steps = [], []

    def add(self, name: str, start: float, end: float, cpu: float) -> None:
        main = threading.current_thread() is threading.main_thread()
        with self._lock:
            self.spans.append(Span(name, start, end, main, cpu))

    def training_windows(self) -> list[tuple[float, float]]:
        """[first step, last step] of each epoch: "training" phase to the next phase."""
        windows, start, previous = [], 0.0, ""
        for at, phase in self.phases:
            if phase == "training" and previous != "training":
                start = at
            elif phase != "training" and previous == "training":
                windows.append((start, at))
            previous = phase
        return windows

    def step_seconds(self, windows: Sequence[tuple[float, float]]) -> list[float]:
        """Each training step's wall time: leaving one should_stop() call to entering the
        next (or the end of its epoch's steps); its callbacks and checkpoints included."""
        steps: list[float] = []
        for start, end in windows:
            marks = [m for m in self.step_marks if start <= m[0] <= end] + [(end, end)]
            steps += [b[0] - a[1] for a, b in itertools.pairwise(marks)]
        return steps


REC = Recorder()
# Wrapped calls that start a cProfile window under --profile (never nested in each other).
# cProfile follows one thread: only the training thread's calls are profiled.
PROFILED = {"checkpoint.snapshot", "reporting.drain", "on_progress"}


def _timed(owner: Any, attr: str, name: str) -> None:
    original: Callable[..., Any] = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        profiler = REC.profiler if name in PROFILED else None
        profiling = profiler is not None and threading.current_thread() is threading.main_thread()
        start, cpu = time.perf_counter(), time.thread_time()
        if profiling:
            assert profiler is not None
            profiler.enable()
        try:
            return original(*args, **kwargs)
        finally:
            if profiling:
                assert profiler is not None
                profiler.disable()
            REC.add(name, start, time.perf_counter(), time.thread_time() - cpu)

    setattr(owner, attr, timed)


def instrument() -> None:
    """Wrap the calls whose cost is reported; record phases and train()'s bounds."""
    import torch

    import worker.footprint
    import worker.training.autocomplete_loop
    import worker.training.checkpoint
    import worker.training.loop
    from apps.core.artifacts import LocalArtifactStore
    from apps.training import runner, services
    from apps.training.tracking import Tracking
    from worker.training.reporting import Background

    _timed(worker.training.loop._Snapshots, "take", "checkpoint.snapshot")
    _timed(worker.training.autocomplete_loop._Snapshot, "take", "checkpoint.snapshot")
    _timed(Background, "drain", "reporting.drain")
    _timed(worker.training.checkpoint, "complete", "checkpoint.complete")
    _timed(runner.RunCallbacks, "on_checkpoint", "on_checkpoint")
    _timed(runner, "pack_dir", "pack_dir")
    _timed(LocalArtifactStore, "put_file", "store.put_file")
    _timed(services, "run_record_checkpoint", "run_record_checkpoint")
    _timed(runner.RunCallbacks, "_beat", "heartbeat")
    _timed(runner.RunCallbacks, "on_metrics", "on_metrics")
    _timed(services, "run_record_metrics", "run_record_metrics")
    _timed(Tracking, "log_metrics", "mlflow.log_metrics")
    _timed(Tracking, "log_model", "mlflow.log_model")
    _timed(Tracking, "start", "mlflow.start")
    _timed(worker.footprint, "measure_memory_bytes", "measure_memory_bytes")
    _timed(services, "run_succeed", "run_succeed")

    on_progress = runner.RunCallbacks.on_progress

    def progress_with_phase(self: Any, progress: Any) -> None:
        REC.phases.append((time.perf_counter(), progress.phase))
        on_progress(self, progress)

    runner.RunCallbacks.on_progress = progress_with_phase  # type: ignore[method-assign]
    _timed(runner.RunCallbacks, "on_progress", "on_progress")

    should_stop = runner.RunCallbacks.should_stop

    def should_stop_marked(self: Any) -> bool:
        entered = time.perf_counter()
        if REC.lockstep is not None and REC.phases and REC.phases[-1][1] == "training":
            deterministic = torch.are_deterministic_algorithms_enabled()
            warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
            torch.use_deterministic_algorithms(False)  # as in bare_loop
            try:
                REC.lockstep_steps.append(next(REC.lockstep))
            except StopIteration:
                REC.lockstep = None
            finally:
                torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        REC.step_marks.append((entered, time.perf_counter()))
        return should_stop(self)

    runner.RunCallbacks.should_stop = should_stop_marked  # type: ignore[method-assign]

    def marked(train: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(train)
        def train_marked(*args: Any, **kwargs: Any) -> Any:
            REC.marks["train_start"] = time.perf_counter()
            REC.result = train(*args, **kwargs)
            REC.marks["train_end"] = time.perf_counter()
            return REC.result

        return train_marked

    # runner.execute imports the loops at call time, so it picks these up.
    worker.training.loop.train = marked(worker.training.loop.train)
    auto = worker.training.autocomplete_loop
    auto.train_autocomplete = marked(auto.train_autocomplete)  # type: ignore[assignment]


# --- A: the project -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectRun:
    samples: int
    train_s: float  # training phase (all epochs)
    total_s: float  # runner.execute, whole
    before_train_s: float  # claim, download, MLflow run: execute() -> train()
    setup_s: float  # train() -> first step: read, tokenizer, model, encode
    after_window_s: float  # in train() after the steps: validation, epoch-end save, predict
    after_train_s: float  # train() -> execute() returns: package, measure, log model
    train_loss: float
    steps: int
    step_s: tuple[float, ...]  # per training step, in order
    spans: tuple[Span, ...]
    windows: tuple[tuple[float, float], ...]

    @property
    def rate(self) -> float:
        return self.samples / self.train_s


class Workbench:
    """A throwaway workbench in this process: settings, DB, one tenant, one scientist."""

    def __init__(self, var_dir: Path) -> None:
        self.var_dir = var_dir
        self.user: Any = None
        self.tenant: Any = None

    def setup(self) -> None:
        for key in ENV_DROP:
            os.environ.pop(key, None)
        os.environ.update(
            {
                "DJANGO_SETTINGS_MODULE": "workbench.settings",
                "WORKBENCH_VAR_DIR": str(self.var_dir),
                "MLFLOW_TRACKING_URI": f"sqlite:///{self.var_dir / 'mlflow.db'}",
                "PROMETHEUS_MULTIPROC_DIR": str(self.var_dir / "prometheus"),
                "LOG_LEVEL": "WARNING",
                "WORKBENCH_COMMIT": commit(),  # not a git call per run
            }
        )
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", interactive=False, verbosity=0)

        from apps.tenants import services as tenants
        from apps.tenants.models import Role
        from apps.training import services

        self.user = tenants.user_create(username="bench", password=os.urandom(16).hex())
        self.tenant = tenants.tenant_create(actor=None, slug="bench", name="Training benchmark")
        tenants.membership_add(actor=None, tenant=self.tenant, user=self.user, role=Role.SCIENTIST)
        # The Celery hops are not measured here: runs_dispatch still marks the run
        # dispatched, and this process runs the task body itself.
        services._enqueue_dispatch = lambda: None
        services._send_run = lambda run_id: None
        instrument()

    def add_version(self, name: str, source: Path) -> Any:
        from django.conf import settings

        from apps.datasets.services import dataset_create, dataset_version_create

        replies = is_autocomplete()
        dataset = dataset_create(
            actor=self.user,
            tenant=self.tenant,
            name=name,
            kind="training",
            task="text-generation" if replies else "text-classification",
        )
        data = source.read_bytes()
        upload = Path(tempfile.mkdtemp(dir=settings.UPLOAD_TMP_DIR)) / source.name
        upload.write_bytes(data)  # the store moves it in
        return dataset_version_create(
            actor=self.user,
            dataset=dataset,
            path=upload,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            filename=source.name,
            text_column="text",
            **({} if replies else {"label_column": "label"}),
        ).version

    def run(self, version: Any, params: dict[str, Any]) -> ProjectRun:
        from apps.training import runner, services
        from apps.training.models import TrainingRun

        run = services.run_launch(
            actor=self.user,
            tenant=self.tenant,
            dataset_version=version,
            base_model=BASE_MODEL,
            params=params,
            model_name="bench",
        )
        if run.pk not in services.runs_dispatch():
            raise RuntimeError(f"run {run.pk} was not dispatched")
        REC.reset()
        started = time.perf_counter()
        status = runner.execute(run.pk)
        finished = time.perf_counter()
        if status != "succeeded":
            error = TrainingRun.objects.get(pk=run.pk).error
            raise RuntimeError(f"run {run.pk} ended {status}:\n{error}")
        windows = REC.training_windows()
        result = REC.result
        train_start, train_end = REC.marks["train_start"], REC.marks["train_end"]
        train_s = sum(end - start for start, end in windows)
        return ProjectRun(
            samples=result.train_rows * params["epochs"],
            train_s=train_s,
            total_s=finished - started,
            before_train_s=train_start - started,
            setup_s=windows[0][0] - train_start,
            after_window_s=(train_end - train_start) - (windows[0][0] - train_start) - train_s,
            after_train_s=finished - train_end,
            train_loss=float(result.metrics["train_loss"]),
            steps=int(result.steps),
            step_s=tuple(REC.step_seconds(windows)),
            spans=tuple(REC.spans),
            windows=tuple(windows),
        )


# --- B: the bare torch loop -----------------------------------------------------------------


@dataclass(frozen=True)
class BareRun:
    samples: int
    setup_s: float
    train_s: float
    train_loss: float
    steps: int
    step_s: tuple[float, ...]  # per training step, in order

    @property
    def rate(self) -> float:
        return self.samples / self.train_s


class BareTrainer:
    """The same training, written as a plain loop: no callbacks, checkpoints or DB."""

    def __init__(self, data: Path, params: dict[str, Any]) -> None:
        import numpy as np
        import torch

        from worker.modeling import encode
        from worker.training import base
        from worker.training.config import DataSpec
        from worker.training.data import read_examples, split_validation

        started = time.perf_counter()
        self.params = params
        self.seed, self.batch_size = int(params["seed"]), int(params["batch_size"])
        self.epochs = int(params["epochs"])
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        examples = read_examples(DataSpec(path=data, text_column="text", label_column="label"))
        train, _ = split_validation(examples, float(params["validation_split"]), self.seed)
        labels = sorted({e.label for e in train})
        from worker import base_models

        # An adapter run's LoRA shape, as the project resolved it into the run's params.
        lora = {k: params[k] for k in base_models.LORA_PARAMS if params.get(k) is not None}
        self.model, tokenizer = base.build(
            BASE_MODEL,
            texts=[e.text for e in train],
            labels=labels,
            max_length=int(params["max_length"]),
            lora=lora or None,
        )
        self.model.to(self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.ids = encode(tokenizer, [e.text for e in train], int(params["max_length"]))
        label_ids = {label: i for i, label in enumerate(labels)}
        self.targets = [label_ids[e.label] for e in train]

        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:  # an adapter's frozen base
                continue
            (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
        fused = self.device == "cuda"
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": float(params["weight_decay"])},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=float(params["learning_rate"]),
            fused=fused,
            foreach=not fused,
        )
        self.steps_per_epoch = math.ceil(len(self.ids) / self.batch_size)
        total = self.steps_per_epoch * self.epochs
        warmup = round(total * float(params["warmup_ratio"]))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.amp = torch.bfloat16 if self.device == "cuda" else None
        self.grad_clip = float(params["grad_clip"])
        self.losses: list[Any] = []
        self.model.train()
        self.setup_s = time.perf_counter() - started

    def steps(self) -> Iterator[float]:
        """Train every epoch; yield each step's wall seconds as it finishes."""
        import torch
        import torch.nn.functional as F

        from worker.modeling import collate

        device, size = self.device, self.batch_size
        for epoch in range(1, self.epochs + 1):
            order = torch.randperm(
                len(self.ids), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)
            ).tolist()
            for b in range(self.steps_per_epoch):
                started = time.perf_counter()
                rows = order[b * size : (b + 1) * size]
                collated = collate([self.ids[i] for i in rows], self.pad_id)
                batch = {k: v.to(device) for k, v in collated.items()}
                targets = torch.tensor([self.targets[i] for i in rows], device=device)
                with torch.autocast(device, dtype=self.amp, enabled=self.amp is not None):
                    logits = self.model(**batch).logits
                loss = F.cross_entropy(logits.float(), targets)
                torch.autograd.backward(loss)
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.losses.append(loss.detach())
                if device == "cuda":
                    torch.cuda.synchronize()
                yield time.perf_counter() - started

    def train_loss(self) -> float:
        """Like the loop's epoch train_loss: a Python sum in step order, last epoch."""
        import torch

        values = torch.stack(self.losses).float().tolist()[-self.steps_per_epoch :]
        return sum(values) / len(values)


class BareLMTrainer:
    """The autocomplete training as a plain loop: the same replies, held-out split, BPE,
    GPT-2 and encoding as ``train_autocomplete`` (its own helpers), a plain AdamW (the
    loop's weight-decay groups, multi-tensor), linear warm-up/decay and clipping; no
    callbacks, validation, checkpoints or DB."""

    def __init__(self, data: Path, params: dict[str, Any]) -> None:
        import numpy as np
        import torch

        from worker import autocomplete
        from worker.reply_data import read_reply_file, split_replies
        from worker.training import autocomplete_loop
        from worker.training.config import TrainConfig

        started = time.perf_counter()
        config = TrainConfig.from_dict({**params, "base_model": BASE_MODEL})
        self.seed, self.batch_size = int(params["seed"]), int(params["batch_size"])
        self.epochs = int(params["epochs"])
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        replies = read_reply_file(data, text_column="text", context_column="context")
        train, _ = split_replies(replies, float(params["validation_split"]), self.seed)
        self.model, tokenizer, meta = autocomplete_loop.build(config, train)
        self.model.to(self.device)
        special = autocomplete.special_ids(tokenizer, meta)
        self.pad_id = special["pad"]
        self.ids = [
            autocomplete.encode_reply(tokenizer, r.text, r.context, meta=meta, ids=special)
            for r in train
        ]
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, parameter in self.model.named_parameters():
            (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
        fused = self.device == "cuda"
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": float(params["weight_decay"])},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=float(params["learning_rate"]),
            fused=fused,
            foreach=not fused,
        )
        self.steps_per_epoch = math.ceil(len(self.ids) / self.batch_size)
        total = self.steps_per_epoch * self.epochs
        warmup = round(total * float(params["warmup_ratio"]))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.amp = torch.bfloat16 if self.device == "cuda" else None
        self.grad_clip = float(params["grad_clip"])
        self.losses: list[Any] = []
        self.model.train()
        self.setup_s = time.perf_counter() - started

    def steps(self) -> Iterator[float]:
        """Train every epoch; yield each step's wall seconds as it finishes."""
        import torch
        import torch.nn.functional as F

        device, size = self.device, self.batch_size
        for epoch in range(1, self.epochs + 1):
            order = torch.randperm(
                len(self.ids), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)
            ).tolist()
            for b in range(self.steps_per_epoch):
                started = time.perf_counter()
                batch = [self.ids[i] for i in order[b * size : (b + 1) * size]]
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.tensor([ids + [self.pad_id] * (width - len(ids))
                                          for ids, _ in batch])  # fmt: skip
                labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
                mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids))
                                     for ids, _ in batch])  # fmt: skip
                with torch.autocast(device, dtype=self.amp, enabled=self.amp is not None):
                    logits = self.model(
                        input_ids=input_ids.to(device), attention_mask=mask.to(device)
                    ).logits
                vocab = logits.shape[-1]
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, vocab).float(),
                    labels[:, 1:].reshape(-1).to(device),
                    ignore_index=-100,
                )
                torch.autograd.backward(loss)
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.losses.append(loss.detach())
                if device == "cuda":
                    torch.cuda.synchronize()
                yield time.perf_counter() - started

    def train_loss(self) -> float:
        """Like the loop's epoch train_loss: a Python sum in step order, last epoch."""
        import torch

        values = torch.stack(self.losses).float().tolist()[-self.steps_per_epoch :]
        return sum(values) / len(values)


def bare_trainer(data: Path, params: dict[str, Any]) -> BareTrainer | BareLMTrainer:
    return BareLMTrainer(data, params) if is_autocomplete() else BareTrainer(data, params)


def bare_loop(data: Path, params: dict[str, Any]) -> BareRun:
    trainer = bare_trainer(data, params)
    started = time.perf_counter()
    step_s = list(trainer.steps())
    train_s = time.perf_counter() - started
    return BareRun(
        samples=len(trainer.ids) * trainer.epochs,
        setup_s=trainer.setup_s,
        train_s=train_s,
        train_loss=trainer.train_loss(),
        steps=len(step_s),
        step_s=tuple(step_s),
    )


@dataclass(frozen=True)
class Lockstep:
    samples: int
    project_s: float  # the project's steps, callbacks and checkpoints included
    bare_s: float  # the bare loop's steps, run one before each project step
    time_based_s: float  # on_progress (+ on_metrics, were it on this thread) in the steps
    bare_share: float  # of the training phase's wall time
    run: ProjectRun

    @property
    def corrected_project_s(self) -> float:
        # Progress reports come once a wall-clock second; with the bare loop's
        # steps in between there were (1 / (1 - bare_share)) times more of them than the
        # project's own steps would have seen: take out the extra ones.
        return self.project_s - self.time_based_s * self.bare_share

    @property
    def ratio(self) -> float:
        return self.bare_s / self.corrected_project_s


def lockstep_run(bench: Workbench, version: Any, data: Path, params: dict[str, Any]) -> Lockstep:
    """A project run with one bare-loop step run before each of its steps (same batch).

    The bare trainer runs inside the project's ``should_stop()``, with deterministic
    algorithms switched off for its step as they are in ``bare_loop``; both sides see the
    same neighbours at the same moment, so their ratio hardly moves with the machine's load.
    """
    trainer = bare_trainer(data, params)
    REC.lockstep = trainer.steps()
    try:
        run = bench.run(version, params)
    finally:
        REC.lockstep = None
    bare = list(REC.lockstep_steps)
    phase = sum(end - start for start, end in run.windows)
    time_based = sum(_seconds(run, name)[0] for name in ("on_progress", "on_metrics"))
    if len(bare) != run.steps or len(run.step_s) != run.steps:
        raise RuntimeError(
            f"lockstep: {len(bare)} bare steps, {len(run.step_s)} project steps, {run.steps} run"
        )
    return Lockstep(
        samples=run.samples,
        project_s=sum(run.step_s),
        bare_s=sum(bare),
        time_based_s=time_based,
        bare_share=sum(bare) / phase,
        run=run,
    )


# --- reporting ----------------------------------------------------------------------------


def _span(values: Sequence[float], fmt: str = ".1f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def _in_windows(span: Span, windows: Sequence[tuple[float, float]]) -> float:
    """Seconds of ``span`` that fall inside the training windows."""
    return sum(max(0.0, min(span.end, e) - max(span.start, s)) for s, e in windows)


def _seconds(
    run: ProjectRun, name: str, *, main: bool | None = True, cpu: bool = False
) -> tuple[float, int]:
    """Seconds of ``name`` calls inside ``run``'s training windows, and how many there were.

    With ``cpu``: the calling thread's CPU seconds in them instead (pro rata where a call
    straddles a window's edge).
    """
    total, calls = 0.0, 0
    for span in run.spans:
        if span.name == name and (main is None or span.main_thread == main):
            inside = _in_windows(span, run.windows)
            if inside > 0:
                wall = span.end - span.start
                total += span.cpu * inside / wall if cpu and wall > 0 else inside
                calls += 1
    return total, calls


def _outside(run: ProjectRun, name: str) -> float:
    return sum(
        span.end - span.start - _in_windows(span, run.windows)
        for span in run.spans
        if span.name == name and span.main_thread
    )


# The training thread's wrapped calls: (label, wrapped name). They add up, with the steps,
# to the training phase.
PHASE_ROWS = (
    (
        "checkpoint snapshot: weights into the CPU copy, optimizer state copied, best/ linked",
        "checkpoint.snapshot",
    ),
    (
        "waiting for the reporting thread (a checkpoint still in flight when the next is due)",
        "reporting.drain",
    ),
    ("on_progress: progress noted for the heartbeat thread (about 1/s)", "on_progress"),
)
TOP_LEVEL = tuple(name for _, name in PHASE_ROWS)
# The other threads' wrapped calls, concurrent with the steps: (label, wrapped name,
# indented under the row above).
THREAD_ROWS = (
    (
        "reporting thread: checkpoint write, model safetensors + tokenizer + optimizer state",
        "checkpoint.complete",
    ),
    ("reporting thread: on_checkpoint, checkpoint upload", "on_checkpoint"),
    (" tar the checkpoint (pack_dir, sha256)", "pack_dir"),
    (" artifact store put_file", "store.put_file"),
    (" DB: record the checkpoint", "run_record_checkpoint"),
    ("reporting thread: on_metrics, metric points (about 1/s)", "on_metrics"),
    (" DB: RunMetric rows", "run_record_metrics"),
    (" MLflow log_batch (SQLite store)", "mlflow.log_metrics"),
    ("heartbeat thread: DB heartbeat + progress (1/s)", "heartbeat"),
)


def phase_table(
    project: Sequence[ProjectRun],
    bare_s: float,
    *,
    phase_s: Callable[[ProjectRun], float] = lambda r: r.train_s,
) -> str:
    """Where the project's training-phase seconds go, medians over the runs.

    ``phase_s``: a run's own training seconds (in lockstep, its steps without the bare
    loop's); ``bare_s``: the bare loop's seconds for the same steps.
    """
    train = statistics.median(phase_s(r) for r in project)
    rows = [
        "| in the training phase (training thread) | seconds per run (median) | share "
        "| calls | CPU seconds of the calling thread |",
        "|---|---|---|---|---|",
    ]

    def row(label: str, name: str, *, main: bool) -> str:
        pairs = [_seconds(r, name, main=main) for r in project]
        seconds = statistics.median(s for s, _ in pairs)
        calls = statistics.median(c for _, c in pairs)
        cpu = statistics.median(_seconds(r, name, main=main, cpu=True)[0] for r in project)
        share = f"{seconds / train:.1%}" if main else ""
        shown = ("↳ " + label.strip()) if label.startswith(" ") else label
        return f"| {shown} | {seconds:.2f} | {share} | {calls:.0f} | {cpu:.2f} |"

    rows += [row(label, name, main=True) for label, name in PHASE_ROWS]
    rest = statistics.median(
        phase_s(r) - sum(_seconds(r, n)[0] for n in TOP_LEVEL) for r in project
    )
    rows.append(
        f"| training steps + loop bookkeeping (the rest) | {rest:.2f} | {rest / train:.1%} | | |"
    )
    rows.append(f"| whole training phase | {train:.2f} | 100% | | |")
    rows.append(f"| bare loop, the same steps | {bare_s:.2f} | {bare_s / train:.1%} | | |")
    rows.append("| *other threads, concurrent with the steps (not in the sum):* | | | | |")
    rows += [row(label, name, main=False) for label, name in THREAD_ROWS]
    return "\n".join(rows)


def fixed_table(project: Sequence[ProjectRun], bare: Sequence[BareRun]) -> str:
    """Seconds per run outside the training phase."""

    def med(values: Sequence[float]) -> str:
        return f"{statistics.median(values):.2f}"

    rows = [
        "| outside the training phase, per run | project s (median) | bare loop s (median) |",
        "|---|---|---|",
        "| before train(): claim, dataset download, MLflow run + params "
        f"| {med([r.before_train_s for r in project])} | - |",
        f"| ↳ MLflow run start | {med([_outside(r, 'mlflow.start') for r in project])} | - |",
        "| train() to the first step: read rows, tokenizer training, model init, encode "
        f"| {med([r.setup_s for r in project])} | {med([b.setup_s for b in bare])} |",
        "| after the last step, in train(): validation, best model, epoch-end checkpoint, "
        f"validation predictions | {med([r.after_window_s for r in project])} | - |",
        "| after train(): model tar + store, memory measurement, MLflow log_model + registry, "
        f"model version | {med([r.after_train_s for r in project])} | - |",
        "| ↳ MLflow log_model + register "
        f"| {med([_outside(r, 'mlflow.log_model') for r in project])} | - |",
        "| ↳ memory measurement "
        f"| {med([_outside(r, 'measure_memory_bytes') for r in project])} | - |",
        f"| whole run (runner.execute) | {med([r.total_s for r in project])} "
        f"| {med([b.setup_s + b.train_s for b in bare])} |",
    ]
    return "\n".join(rows)


@dataclass
class Results:
    rows: int
    per_label: int
    train_rows: int
    params: dict[str, Any]
    project: list[ProjectRun] = field(default_factory=list)
    bare: list[BareRun] = field(default_factory=list)
    lockstep: list[Lockstep] = field(default_factory=list)
    # Lockstep with checkpoint_min_seconds 0: a checkpoint every checkpoint_every_steps.
    lockstep_frequent: list[Lockstep] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)


def lockstep_row(what: str, runs: Sequence[Lockstep]) -> str:
    lock = [x.ratio for x in runs]
    lock_ratio = statistics.median(lock)
    lock_text = f"{lock_ratio:.3f}x" + (
        f" ({min(lock):.3f}-{max(lock):.3f})" if len(lock) > 1 else ""
    )
    lock_ok = 1 - lock_ratio <= OVERHEAD_TARGET
    return (
        f"| {what}, {len(lock)} run{'s' if len(lock) != 1 else ''} (samples/s) "
        f"| {_span([x.samples / x.corrected_project_s for x in runs])} "
        f"| bare torch loop {_span([x.samples / x.bare_s for x in runs])} "
        f"| {lock_text}; overhead {1 - lock_ratio:.1%} | overhead ≤ {OVERHEAD_TARGET:.0%} "
        f"| {'yes' if lock_ok else 'no'} |"
    )


def table(res: Results) -> tuple[str, bool]:
    ours = [r.rate for r in res.project]
    ref = [b.rate for b in res.bare]
    # Each project run against the bare run right after it: the pairs share the noise.
    ratios = [p.rate / b.rate for p, b in zip(res.project, res.bare, strict=True)]
    ratio = statistics.median(ratios)
    overheads = sorted(1 - r for r in ratios)
    overhead = 1 - ratio
    ratio_text = f"{ratio:.3f}x" + (
        f" ({min(ratios):.3f}-{max(ratios):.3f})" if len(ratios) > 1 else ""
    )
    overhead_text = f"overhead {overhead:.1%}" + (
        f" ({overheads[0]:.1%} to {overheads[-1]:.1%})" if len(overheads) > 1 else ""
    )
    ok = overhead <= OVERHEAD_TARGET
    epochs = res.params["epochs"]
    rows = [
        "| figure | project | reference | ratio | target | met? |",
        "|---|---|---|---|---|---|",
        f"| training throughput, {BASE_MODEL} on {res.train_rows:,} {data_name()} x {epochs} "
        f"epoch{'s' if epochs != 1 else ''}, training phase (samples/s) | {_span(ours)} "
        f"| bare torch loop {_span(ref)} | {ratio_text}; {overhead_text} "
        f"| overhead ≤ {OVERHEAD_TARGET:.0%} | {'yes' if ok else 'no'} |",
    ]
    if res.lockstep:
        rows.append(
            lockstep_row(
                "the same in lockstep: a bare-loop step (same batch) run just before each "
                "project step",
                res.lockstep,
            )
        )
    if res.lockstep_frequent:
        every = res.params["checkpoint_every_steps"]
        rows.append(
            lockstep_row(
                f"lockstep with a checkpoint every {every} steps (checkpoint_min_seconds 0, "
                "not the default)",
                res.lockstep_frequent,
            )
        )
    # The workbench's own calls, timed where they run: what the ratio's noise can hide.
    shares = [sum(_seconds(r, n)[0] for n in TOP_LEVEL) / r.train_s for r in res.project]
    share = statistics.median(shares)
    share_text = f"{share:.1%}" + (
        f" ({min(shares):.1%}-{max(shares):.1%})" if len(shares) > 1 else ""
    )
    rows.append(
        "| share of the training phase spent in the workbench's callbacks and checkpoint "
        f"snapshots (training thread) | {share_text} | bare torch loop 0% | - "
        f"| ≤ {OVERHEAD_TARGET:.0%} | {'yes' if share <= OVERHEAD_TARGET else 'no'} |"
    )
    return "\n".join(rows), ok


def machine_facts(device: str) -> list[str]:
    import torch

    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    gpus = gpu()
    where = "trained on the GPU" if device == "cuda" else "trained on the CPU"
    return [
        f"CPU: {cpu_model()}, {usable} usable of {cores} cores; torch threads: "
        f"{torch.get_num_threads()}",
        f"memory: {mem_total_gib():.1f} GiB",
        f"GPU: {gpus} ({where})",
        f"OS: {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}",
    ]


def lockstep_notes(res: Results) -> list[str]:
    if not res.lockstep:
        return []
    return [
        "lockstep: a project run during which, inside its should_stop() before each step, the "
        "bare loop (built beforehand, deterministic algorithms off as in the A B reps) trains "
        "the same batch; the project's steps are timed from leaving should_stop() to entering "
        "it again. Progress reports come once a wall-clock second, so the bare steps between "
        "raise their count: the share of them the bare loop's time caused is taken out "
        "(time-based callbacks on the training thread x bare share of the wall time). The "
        "reporting and heartbeat threads run beside both sides' steps alike, so lockstep "
        "cannot see their cost: it is in the A B figure, and their CPU seconds are below",
        "lockstep seconds per run, project measured / corrected: "
        + ", ".join(f"{x.project_s:.2f} / {x.corrected_project_s:.2f}" for x in res.lockstep)
        + "; bare loop: "
        + ", ".join(f"{x.bare_s:.2f}" for x in res.lockstep),
        *(
            [
                "lockstep with a checkpoint every "
                f"{res.params['checkpoint_every_steps']} steps, project measured / corrected: "
                + ", ".join(
                    f"{x.project_s:.2f} / {x.corrected_project_s:.2f}"
                    for x in res.lockstep_frequent
                )
                + "; bare loop: "
                + ", ".join(f"{x.bare_s:.2f}" for x in res.lockstep_frequent)
            ]
            if res.lockstep_frequent
            else []
        ),
    ]


def report(res: Results, *, commit: str, when: str, device: str, threads: int) -> tuple[str, bool]:
    body, ok = table(res)
    reps = len(res.project)
    p = res.params
    same_loss = all(
        abs(a.train_loss - b.train_loss) <= 1e-6 for a, b in zip(res.project, res.bare, strict=True)
    )
    notes = [
        f"data: {res.rows:,} {data_name()} (up to {res.per_label} per "
        f"{'service' if is_autocomplete() else 'label'}), "
        f"{res.train_rows:,} trained on after the {p['validation_split']:.0%} validation split; "
        f"{reps} repetition{'s' if reps != 1 else ''} interleaved A B, median (min-max); "
        "ratio: median over the reps of project / bare loop in the same rep",
        f"run settings (API defaults but epochs): batch_size {p['batch_size']}, max_length "
        f"{p['max_length']}, learning_rate {p['learning_rate']}, epochs {p['epochs']}, "
        f"checkpoint_every_steps {p['checkpoint_every_steps']}, checkpoint_min_seconds "
        f"{p['checkpoint_min_seconds']:g}, log_every_steps "
        f"{p['log_every_steps']}, grad_clip {p['grad_clip']}, seed {p['seed']}",
        "training phase seconds per rep, project: "
        + ", ".join(f"{r.train_s:.2f}" for r in res.project)
        + "; bare loop: "
        + ", ".join(f"{b.train_s:.2f}" for b in res.bare),
        "same model, same data: train_loss after the epoch, project "
        + ", ".join(f"{r.train_loss:.6f}" for r in res.project)
        + " / bare loop "
        + ", ".join(f"{b.train_loss:.6f}" for b in res.bare)
        + (" (equal)" if same_loss else " (NOT equal)"),
        "project: apps.training.runner.execute in this process on a run launched with "
        "run_launch and dispatched with runs_dispatch (Celery enqueues stubbed out); SQLite "
        "DB, local artifact store and MLflow on SQLite in a fresh var dir; a warm-up run of "
        "each side (MLflow schema, imports) before timing",
        "training phase: the loop's first step of an epoch to its last (its 'training' to "
        "'validating' progress reports; the bare loop: a timer around its step loop)",
        *lockstep_notes(res),
        f"torch intra-op threads: {threads} on both sides (see the benchmark's docstring)",
        f"1-minute load average at start / end: {res.load[0]:.2f} / {res.load[1]:.2f} "
        "(the machine is shared)",
        *machine_facts(device),
    ]
    text = (
        f"### training_overhead — {when} — commit {commit}\n\n"
        f"{body}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    )
    text += (
        "\nWhere the project's training-phase time goes (wrapped calls, inside the phase):\n\n"
        f"{phase_table(res.project, statistics.median(b.train_s for b in res.bare))}\n"
    )
    if res.lockstep_frequent:
        runs = res.lockstep_frequent
        text += (
            f"\nThe same in the lockstep run{'s' if len(runs) != 1 else ''} with a checkpoint "
            f"every {res.params['checkpoint_every_steps']} steps (checkpoint_min_seconds 0; "
            "the project's own step seconds, the bare loop's taken out):\n\n"
            + phase_table(
                [x.run for x in runs],
                statistics.median(x.bare_s for x in runs),
                phase_s=lambda r: sum(r.step_s),
            )
            + "\n"
        )
    text += (
        f"\nFixed costs per run (not in the throughput):\n\n{fixed_table(res.project, res.bare)}\n"
    )
    return text, ok


def profile_callbacks(bench: Workbench, version: Any, params: dict[str, Any]) -> str:
    """One more project run with cProfile on inside the callbacks; the top entries."""
    REC.profiler = cProfile.Profile()
    try:
        run = bench.run(version, params)
    finally:
        profiler, REC.profiler = REC.profiler, None
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(30)
    return (
        "cProfile inside the training thread's checkpoint snapshots, waits for the reporting "
        "thread and on_progress calls, one run "
        f"(training phase {run.train_s:.1f} s, {run.rate:.1f} samples/s under the profiler):\n"
        + out.getvalue()
    )


# --- main ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="training-overhead-"))
    try:
        data = work / "train-slice.csv"
        warm = work / "train-warmup.csv"
        if is_autocomplete():
            rows = write_replies(data, args.per_label)
            write_replies(warm, 12)
            print(f"data: {rows:,} replies ({args.per_label} per service) from {SGD_REPLIES}")
        else:
            rows = write_slice(data, args.per_label)
            write_slice(warm, 6)
            print(f"data: {rows:,} rows ({args.per_label} per label) from {BANKING77}")

        print("setting up a throwaway workbench (migrate, tenant, datasets) ...", flush=True)
        bench = Workbench(work / "var")
        bench.setup()
        from worker import base_models
        from worker.training.config import TrainConfig

        # As the API resolves a run's params: the base model's learning rate, then defaults.
        # The base's defaults (its learning rate; an adapter's epochs, batch and LoRA shape).
        defaults = base_models.get(BASE_MODEL).defaults()
        if is_autocomplete():
            # The API's own resolution: only the keys an autocomplete run takes.
            from apps.training.params import params_resolve

            params, problems = params_resolve(base_model=BASE_MODEL, given=PARAM_OVERRIDES)
            if problems:
                raise ValueError(f"parameters refused: {problems}")
        else:
            config = TrainConfig(base_model=BASE_MODEL, **{**defaults, **PARAM_OVERRIDES})
            params = config.to_dict()
            params.pop("base_model")
            params = {k: v for k, v in params.items() if v is not None}
        version = bench.add_version("train-slice", data)
        warm_version = bench.add_version("train-warmup", warm)

        device = "cuda" if torch.cuda.is_available() else "cpu"
        print("warm-up (imports, MLflow schema), not timed ...", flush=True)
        bench.run(warm_version, params)
        bare_loop(warm, params)

        res = Results(rows=rows, per_label=args.per_label, train_rows=0, params=params)
        load_start = os.getloadavg()[0]
        for rep in range(1, args.reps + 1):
            ours = bench.run(version, params)
            ref = bare_loop(data, params)
            res.project.append(ours)
            res.bare.append(ref)
            res.train_rows = ours.samples // params["epochs"]
            print(
                f"  rep {rep}: project {ours.rate:.1f} samples/s ({ours.train_s:.2f} s; run "
                f"{ours.total_s:.1f} s) | bare loop {ref.rate:.1f} samples/s "
                f"({ref.train_s:.2f} s) | ratio {ours.rate / ref.rate:.3f}",
                flush=True,
            )
        every = params["checkpoint_every_steps"]
        lockstep_kinds = (
            ("lockstep", params, args.lockstep_reps, res.lockstep),
            (
                f"lockstep, a checkpoint every {every} steps,",
                {**params, "checkpoint_min_seconds": 0},
                args.frequent_checkpoint_reps,
                res.lockstep_frequent,
            ),
        )
        for label, run_params, reps, results in lockstep_kinds:
            for rep in range(1, reps + 1):
                lock = lockstep_run(bench, version, data, run_params)
                results.append(lock)
                print(
                    f"  {label} {rep}: project {lock.corrected_project_s:.2f} s of steps "
                    f"(measured {lock.project_s:.2f} s) | bare loop {lock.bare_s:.2f} s | ratio "
                    f"{lock.ratio:.3f}",
                    flush=True,
                )
        res.load = (load_start, os.getloadavg()[0])
        entry, ok = report(
            res,
            commit=commit(),
            when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            device=device,
            threads=args.threads,
        )
        print("\n" + entry)
        if args.record:
            record(entry)
            print(f"recorded in {README.relative_to(ROOT)}")
        if args.profile:
            print("\n" + profile_callbacks(bench, version, params))
        print("target met" if ok else "target NOT met")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 rows per label, 1 rep (CI)")
    parser.add_argument(
        "--base-model",
        default="tiny-bert",
        help="the catalogue entry both sides train (default tiny-bert; minilm-l6-lora: a "
        "LoRA adapter on the shared MiniLM, the bare side a plain loop over the same peft model)",
    )
    parser.add_argument(
        "--per-label",
        type=int,
        help="banking77 rows per label (default 120; 10 with --quick); with tiny-gpt2, SGD "
        "replies per service (default 300; 20 with --quick)",
    )
    parser.add_argument("--reps", type=int, help="A B repetitions (default 4; 1 with --quick)")
    parser.add_argument(
        "--lockstep-reps",
        type=int,
        help="lockstep runs after the A B reps (default 2; 1 with --quick; 0: none)",
    )
    parser.add_argument(
        "--frequent-checkpoint-reps",
        type=int,
        help="lockstep runs with checkpoint_min_seconds 0, a checkpoint every "
        "checkpoint_every_steps steps, after the others (default 1; 0 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides (default 1; see the module docstring)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the reps, one more project run with cProfile inside the callbacks",
    )
    add_record_flags(parser)
    args = parser.parse_args(argv)
    global BASE_MODEL
    BASE_MODEL = args.base_model
    if BASE_MODEL == "tiny-gpt2":
        # 1,500 replies: ~45 steps of 32, 20-30 s of training on one quiet core (all 7,848
        # replies took ~1.8 s a step at load average 7: 7 min an epoch, 14 epochs a run).
        args.per_label = args.per_label or (20 if args.quick else 300)
    args.per_label = args.per_label or (10 if args.quick else 120)
    args.reps = args.reps or (1 if args.quick else 4)
    if args.lockstep_reps is None:
        args.lockstep_reps = 1 if args.quick else 2
    if args.frequent_checkpoint_reps is None:
        args.frequent_checkpoint_reps = 0 if args.quick else 1
    data = SGD_REPLIES / SGD_SERVICES[0] / "train.csv" if is_autocomplete() else BANKING77
    return launch(parser, args, run, data=data)


if __name__ == "__main__":
    sys.exit(main())
