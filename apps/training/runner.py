"""Run one claimed training run on this worker: data in, model version out.

The glue between the database, the artifact store, MLflow and ``worker.training`` (which
knows none of them). Every write about the run is fenced by the claim's ``attempt``: if
this worker lost the run (its heartbeat went stale and another worker took it over), its
writes do nothing and it stops. Writes that leave the database cannot be fenced by an
UPDATE, so they are made safe twice: the keys an attempt stores under carry its number
(a zombie attempt never overwrites the bytes a registered version names), and each upload,
MLflow registration and MLflow metric write is preceded by a lease check.

Nothing here runs long on the training thread: ``should_stop`` and ``on_progress`` only
read and note; the heartbeat thread writes progress (once a second, at once on a phase
change) and learns of a cancel; metric rows, MLflow and checkpoint uploads run on the
loop's reporting thread (``worker.training.reporting.Background``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import close_old_connections, connection

from apps.core.artifacts import download, get_store
from apps.core.leases import Heartbeat
from apps.training import services
from apps.training.models import TrainingRun
from apps.training.packaging import pack_dir, unpack
from apps.training.tracking import Tracking

if TYPE_CHECKING:
    from worker.training.loop import TrainResult

log = logging.getLogger(__name__)
# Each beat writes the latest progress, if any, and reads the cancel flag.
HEARTBEAT_SECONDS = 1.0


def checkpoint_key(tenant_id: str, run_id: str, attempt: int) -> str:
    """Where an attempt stores its checkpoint; the next attempt resumes from the key the
    run's row names (the last checkpoint any attempt recorded)."""
    return f"runs/{tenant_id}/{run_id}/a{attempt}/checkpoint.tar"


def model_prefix(tenant_id: str, run_id: str, attempt: int) -> str:
    return f"models/{tenant_id}/{run_id}/a{attempt}"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _git_commit() -> str:
    if os.environ.get("WORKBENCH_COMMIT"):
        return os.environ["WORKBENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=settings.BASE_DIR,
            check=True,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(run: TrainingRun, device: str) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "workbench_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dataset_sha256": run.dataset_version.sha256,
        "validation_sha256": run.validation_version.sha256 if run.validation_version else None,
        "device": device,
        "worker": worker_name(),
    }


class RunCallbacks:
    """``worker.training`` callbacks that report to the database, MLflow and the store."""

    def __init__(self, run: TrainingRun, tracking: Tracking, work_dir: Path) -> None:
        self.run_id = run.pk
        self.attempt = run.attempt
        self.tenant_id = run.tenant_id
        self.tracking = tracking
        self.work_dir = work_dir
        self.superseded = False  # a fenced write found the run no longer this attempt's
        self.cancel = False
        self.progress: dict[str, Any] = {}
        self._unsent: dict[str, Any] | None = None  # progress not yet written
        self._lines: list[str] = []
        self._lock = threading.Lock()
        # A heartbeat thread: it proves the worker alive through long phases without steps
        # (loading, saving, measuring), writes the progress the loop notes, and hears of a
        # cancel within a second. Uploads run elsewhere, so a slow one never stalls a beat.
        # It survives database errors (retries with backoff) and, after
        # TRAINING_HEARTBEAT_MAX_FAILURES in a row, gives the run up: training stops.
        self.heartbeat = Heartbeat(
            self._beat,
            every=HEARTBEAT_SECONDS,
            lease_seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_SECONDS,
            max_failures=settings.TRAINING_HEARTBEAT_MAX_FAILURES,
            name=f"heartbeat-{run.pk}-a{run.attempt}",
        )

    @property
    def lost(self) -> bool:
        """This attempt no longer holds the run (taken over, or its lease not renewed)."""
        return self.superseded or not self.heartbeat.held

    def start(self) -> None:
        self.heartbeat.start()

    def close(self) -> None:
        self.heartbeat.close()

    def _beat(self) -> bool:
        with self._lock:
            progress, self._unsent = self._unsent, None
            lines, self._lines = self._lines, []
        try:
            beat = services.run_heartbeat(
                run_id=self.run_id, attempt=self.attempt, progress=progress, log_lines=lines
            )
        except Exception:
            # Not written: keep it for the next beat (newer progress, if any, wins).
            with self._lock:
                self._unsent = self._unsent or progress
                self._lines = lines + self._lines
            raise
        self.cancel = self.cancel or beat.cancel
        return beat.held

    def holds(self) -> bool:
        """Whether this attempt still holds the run, asked of the database (renewing the
        lease) right before a write that leaves it."""
        if self.lost:
            return False
        if not services.run_lease_check(run_id=self.run_id, attempt=self.attempt):
            self.superseded = True
            log.warning("run taken over by another attempt", extra={"run": self.run_id})
        return not self.superseded

    def log_line(self, line: str) -> None:
        log.info(line, extra={"run": self.run_id})
        with self._lock:
            self._lines.append(f"{time.strftime('%H:%M:%S')} {line}")

    # --- worker.training.Callbacks ------------------------------------------------------
    def on_progress(self, progress: Any) -> None:
        # On the training thread: note it for the heartbeat thread, woken at a phase change.
        changed = progress.phase != self.progress.get("phase")
        self.progress = asdict(progress)
        with self._lock:
            self._unsent = self.progress
        if changed:
            self.heartbeat.wake()

    def on_metrics(self, points: list[Any]) -> None:
        if not self.holds():
            return  # a superseded attempt's curve is not the run's
        rows = [asdict(p) for p in points]
        services.run_record_metrics(run_id=self.run_id, points=rows)
        self.tracking.log_metrics(rows)
        for row in rows:
            if row["name"].startswith("val_"):
                self.log_line(f"epoch {row.get('epoch')}: {row['name']}={row['value']:.4f}")

    def should_stop(self) -> bool:
        return self.cancel or self.lost

    def on_checkpoint(self, local_dir: Path, step: int) -> None:
        if not self.holds():
            return
        archive = self.work_dir / "checkpoint.tar"
        pack_dir(local_dir, archive)
        key = checkpoint_key(self.tenant_id, self.run_id, self.attempt)
        get_store().put_file(key, archive, move=True)
        if not services.run_record_checkpoint(
            run_id=self.run_id, attempt=self.attempt, key=key, step=step
        ):
            self.superseded = True
            return
        self.log_line(f"checkpoint at step {step}")

    def on_reporting_thread_exit(self) -> None:
        connection.close()  # the one on_metrics and on_checkpoint used there


def _fetch(key: str, target: Path) -> Path:
    download(key, target)
    return target


def execute(run_id: str, worker: str | None = None) -> str:
    """Claim and run ``run_id``; returns the run's status afterwards (or 'skipped', or
    'lost' when another attempt took the run over)."""
    close_old_connections()
    # Claim first: importing torch and transformers takes seconds on a cold worker, and
    # the run should show `running` (and stop looking queued) at once.
    run = services.run_claim(run_id=run_id, worker=worker or worker_name())
    if run is None:
        return "skipped"
    run = TrainingRun.objects.select_related(
        "tenant", "dataset_version__dataset", "validation_version__dataset"
    ).get(pk=run.pk)
    work = Path(settings.TRAINING_WORK_DIR) / f"{run.pk}-a{run.attempt}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    callbacks = RunCallbacks(run, Tracking(), work)
    callbacks.start()
    try:
        result = train_run(run, callbacks)
        return publish_run(run, result, callbacks)
    except Exception as exc:
        log.exception("training run failed", extra={"run": run.pk})
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        failed = services.run_fail(
            run_id=run.pk,
            attempt=run.attempt,
            error=f"{detail}\n\n{traceback.format_exc()[-3000:]}",
        )
        if failed is None:
            return "lost"  # the MLflow run is the new attempt's now: leave it alone
        try:
            callbacks.tracking.end("FAILED")
        except Exception:
            log.warning("could not mark the MLflow run failed", exc_info=True)
        return "failed"
    finally:
        callbacks.close()
        shutil.rmtree(work, ignore_errors=True)


def train_run(run: TrainingRun, callbacks: RunCallbacks) -> TrainResult:
    """Fetch the data (and the last checkpoint, whichever attempt stored it) and train: a
    classifier; for an embedding base model an embedding model on the pairs and their
    knowledge base (the version's documents file); for an autocomplete base model an
    autocomplete model on the replies and their contexts."""
    from worker import base_models
    from worker.training.autocomplete_loop import train_autocomplete
    from worker.training.config import DataSpec, TrainConfig
    from worker.training.embedding_loop import train_embedder
    from worker.training.loop import train

    work = callbacks.work_dir
    kind = base_models.get(run.base_model).kind
    embedding = kind == base_models.KIND_EMBEDDING
    # A reply corpus's version keeps its context column as label_column ("" without one).
    loop = {
        base_models.KIND_EMBEDDING: train_embedder,
        base_models.KIND_AUTOCOMPLETE: train_autocomplete,
    }.get(kind, train)

    def spec(version: Any, name: str) -> DataSpec:
        documents = None
        if embedding:
            if not version.documents_storage_key:
                raise ValueError(f"dataset version {version.pk} has no documents file")
            documents = _fetch(
                version.documents_storage_key,
                work / f"{name}-documents.{version.documents_format}",
            )
        return DataSpec(
            path=_fetch(version.storage_key, work / f"{name}.{version.format}"),
            text_column=version.text_column,
            label_column=version.label_column,
            format=version.format,
            documents_path=documents,
            documents_format=version.documents_format or "csv",
        )

    version = run.dataset_version
    train_spec = spec(version, "train")
    validation_spec = None
    if run.validation_version is not None:
        validation_spec = spec(run.validation_version, "validation")
    resume_dir = None
    if run.checkpoint_key:
        archive = _fetch(run.checkpoint_key, work / "resume.tar")
        resume_dir = unpack(archive, work / "resume")
        callbacks.log_line(f"resuming from the checkpoint at step {run.checkpoint_step}")
    config = TrainConfig.from_dict({**run.params, "base_model": run.base_model})
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mlflow_run_id = callbacks.tracking.start(
        existing_run_id=run.mlflow_run_id,
        tenant_slug=run.tenant.slug,
        run_name=run.pk,
        params={**config.to_dict(), "dataset_version": version.pk},
        tags={"workbench.run_id": run.pk, "workbench.tenant": run.tenant.slug},
    )
    services.run_set_tracking(
        run_id=run.pk,
        attempt=run.attempt,
        mlflow_run_id=mlflow_run_id,
        environment=environment(run, device),
    )
    callbacks.log_line(f"attempt {run.attempt} on {worker_name()} ({device})")
    return loop(
        config,
        train_spec,
        validation_data=validation_spec,
        work_dir=work,
        callbacks=callbacks,
        resume_dir=resume_dir,
    )


def publish_run(run: TrainingRun, result: TrainResult, callbacks: RunCallbacks) -> str:
    """Store the trained model, register it (MLflow and the registry) and finish the run,
    or finish it cancelled; 'lost' and nothing written when the attempt was superseded."""
    from worker.footprint import measure_memory_bytes
    from worker.modeling import artifact_format

    tracking, work = callbacks.tracking, callbacks.work_dir
    if callbacks.lost:
        log.warning("run taken over by another worker; stopping", extra={"run": run.pk})
        return "lost"
    if result.stop_reason == "cancelled":
        cancelled = services.run_mark_cancelled(
            run_id=run.pk,
            attempt=run.attempt,
            progress={**callbacks.progress, "phase": "cancelled"},
        )
        if cancelled is None:
            return "lost"
        tracking.end("KILLED")
        return "cancelled"
    callbacks.log_line(f"stopped: {result.stop_detail}")
    prefix = model_prefix(run.tenant_id, run.pk, run.attempt)
    keys = {"model": f"{prefix}/model.tar", "predictions": f"{prefix}/predictions.jsonl"}
    sha256, size = pack_dir(result.model_dir, work / "model.tar")
    predictions = work / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(p) + "\n" for p in result.validation_predictions))
    # A validation row's text (a classifier's), query (an embedding model's) or held-out
    # reply prefix (an autocomplete model's).
    texts = [
        str(p.get("text", p.get("query", p.get("prefix", ""))))
        for p in result.validation_predictions[:32]
    ] or ["hello"]
    memory = measure_memory_bytes(result.model_dir, texts)
    shape = artifact_format(result.model_dir)  # an adapter's own bytes are in memory
    labels: Any = []  # an embedding model has none
    if (result.model_dir / "labels.json").is_file():
        labels = json.loads((result.model_dir / "labels.json").read_text())
    if isinstance(labels, dict):
        labels = [labels[str(i)] for i in range(len(labels))]
    store = get_store()
    if not callbacks.holds():
        return "lost"
    store.put_file(keys["model"], work / "model.tar", move=True)
    store.put_file(keys["predictions"], predictions, move=True)
    registered_name = f"{run.tenant.slug}.{run.model_name}"
    if not callbacks.holds():
        _take_back(store, keys)
        return "lost"
    mlflow_version = tracking.log_model(
        result.model_dir, registered_name, artifact_path=f"model-a{run.attempt}"
    )
    finished = services.run_succeed(
        run_id=run.pk,
        attempt=run.attempt,
        metrics=result.metrics,
        stop_reason=result.stop_reason,
        stop_detail=result.stop_detail,
        progress={**callbacks.progress, "phase": "done"},
        version_fields={
            "artifact_key": keys["model"],
            "sha256": sha256,
            "size_bytes": size,
            "memory_bytes": memory,
            "predictions_key": keys["predictions"],
            "labels": labels,
            "metrics": result.metrics,
            "mlflow_version": mlflow_version,
            "format": shape["format"],
            "base_sha256": shape.get("base_sha256") or "",
            "base_memory_bytes": int(shape.get("base_memory_bytes") or 0),
        },
        samples=result.samples,
    )
    if finished is None:
        # Taken over between the last check and the commit: take back what this attempt
        # stored and registered, so the run has only the new attempt's version.
        _take_back(store, keys)
        tracking.delete_model_version(registered_name, mlflow_version)
        return "lost"
    tracking.end("FINISHED")
    return "succeeded"


def _take_back(store: Any, keys: dict[str, str]) -> None:
    for key in keys.values():
        try:
            store.delete(key)
        except Exception:
            log.warning("could not delete %s of a superseded attempt", key, exc_info=True)
