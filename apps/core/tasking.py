"""Celery signal handlers: carry the request id into tasks and count tasks for /metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals

from apps.core.context import get_request_id, reset_request_id, set_request_id
from apps.core.metrics import TASK_SECONDS, TASKS_TOTAL

log = logging.getLogger("workbench.tasks")
_started: dict[str, tuple[float, Any]] = {}


def _before_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = get_request_id()
    if headers is not None and request_id and "request_id" not in headers:
        headers["request_id"] = request_id


def _prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
    request_id = getattr(task.request, "request_id", None) if task is not None else None
    token = set_request_id(request_id or f"task-{task_id}")
    _started[task_id] = (time.perf_counter(), token)
    log.info("task started", extra={"task": getattr(task, "name", "?"), "task_id": task_id})


def _postrun(task_id: str = "", task: Any = None, state: str | None = None, **_: Any) -> None:
    started, token = _started.pop(task_id, (None, None))
    name = getattr(task, "name", "?")
    outcome = (state or "unknown").lower()
    if started is not None:
        elapsed = time.perf_counter() - started
        TASK_SECONDS.labels(name, outcome).observe(elapsed)
    TASKS_TOTAL.labels(name, outcome).inc()
    log.info("task finished", extra={"task": name, "task_id": task_id, "outcome": outcome})
    if token is not None:
        try:
            reset_request_id(token)
        except ValueError:  # reset from another context: nothing to restore
            set_request_id(None)


def connect_signals() -> None:
    signals.before_task_publish.connect(_before_publish, weak=False)
    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
