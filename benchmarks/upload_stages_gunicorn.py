"""gunicorn config used by ``upload_throughput.py --stages``: where an upload's time goes.

Loaded with ``gunicorn -c``. Once the worker is up it wraps the server-side steps of a
dataset upload with wall-clock timers and, after each request, appends one JSON line
(seconds per step, and for the whole request) to ``$UPLOAD_STAGES_LOG``. The wrappers
add a few ``perf_counter`` calls per request and change nothing else.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

from workbench.gunicorn_conf import *  # noqa: F403  (the production settings and body-read fix)

_seconds: dict[str, float] = {}
_started: list[float] = []

# (module, attribute path, step name); nested steps are subtracted from their parent below.
STEPS = (
    ("rest_framework.request", "Request._load_data_and_files", "receive + multipart parse"),
    ("apps.core.uploads", "HashingUploadHandler.receive_data_chunk", "  of which sha256 + write"),
    ("apps.datasets.ingest", "scan_bytes", "scan_bytes (UTF-8, line lengths)"),
    ("apps.datasets.ingest", "profile_csv", "profile_csv (pyarrow pass)"),
    ("apps.datasets.ingest", "_duplicates", "  of which duplicate count (sort)"),
    ("apps.core.artifacts", "LocalArtifactStore.put_file", "store (artifact put_file)"),
)


def _wrap(owner: Any, attr: str, step: str) -> None:
    original: Callable[..., Any] = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _seconds[step] = _seconds.get(step, 0.0) + time.perf_counter() - started

    setattr(owner, attr, timed)


def post_worker_init(worker: Any) -> None:
    import importlib

    # The worker has loaded the WSGI app (so Django is set up) before this hook runs.
    for module_name, path, step in STEPS:
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        _wrap(owner, attr, step)


def pre_request(worker: Any, req: Any) -> None:
    _seconds.clear()
    _started[:] = [time.perf_counter()]


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    if not _started or req.method != "POST":
        return
    record = {"path": req.path, "total": time.perf_counter() - _started[0], **_seconds}
    with open(os.environ["UPLOAD_STAGES_LOG"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
