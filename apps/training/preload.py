"""What a worker's pool processes would each import on their first GPU task (torch,
transformers, tokenizers, the serving and batch code), imported once in the worker's main
process before it forks them.

A pool process that replaces one that died (a SIGKILL, the OOM killer) then starts with
the modules in memory — shared copy-on-write — instead of spending seconds importing them
before it can take the dead one's job over; every first run, evaluation or batch job of a
fresh pool process gains the same. Only imports: no tensor is made, no thread pool or
CUDA context started, so forking afterwards is safe (``CUDA_VISIBLE_DEVICES`` is still set
per child in ``worker_process_init``, before CUDA starts there). ``WORKER_PRELOAD=0`` turns
it off.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

MODULES = (
    "torch",
    "tokenizers",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "worker.serving.loading",
    "worker.batch",
    "worker.inference",
)


def preload(**_: Any) -> None:
    if os.environ.get("WORKER_PRELOAD", "1") in ("0", "false", "no"):
        return
    started = time.perf_counter()
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # a module this host lacks is imported (and fails) where used
            log.warning("could not preload %s", name, exc_info=True)
    log.info("preloaded modules for the pool", extra={"ms": (time.perf_counter() - started) * 1000})


def connect() -> None:
    from celery import signals

    signals.worker_init.connect(preload, weak=False)
