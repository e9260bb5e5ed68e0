"""One training task per GPU: each Celery pool process is pinned to one device.

A GPU host runs ``WORKBENCH_GPU_IDS=0,1,2,3 celery -A workbench worker -Q gpu
--concurrency 4``; pool process *i* sees only GPU ``ids[i]`` (``CUDA_VISIBLE_DEVICES``), so
four runs share the host without sharing a GPU. Set before CUDA is initialised in the
child, which is why it happens in ``worker_process_init``.
"""

from __future__ import annotations

import os
from typing import Any


def gpu_for_child(index: int, ids: str) -> str | None:
    devices = [d.strip() for d in ids.split(",") if d.strip()]
    if not devices:
        return None
    return devices[index % len(devices)]


def pin_child_to_gpu(**_: Any) -> None:
    from billiard.process import current_process

    device = gpu_for_child(
        getattr(current_process(), "index", 0) or 0, os.environ.get("WORKBENCH_GPU_IDS", "")
    )
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device


def connect() -> None:
    from celery import signals

    signals.worker_process_init.connect(pin_child_to_gpu, weak=False)
