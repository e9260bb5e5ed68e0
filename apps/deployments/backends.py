"""The serving backend this process drives, built once from settings."""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings

from apps.deployments.models import ServingPool
from worker.serving.specs import PoolSpec, ServingBackend

_lock = threading.Lock()
_backend: ServingBackend | None = None


def get_backend() -> ServingBackend:
    """One backend per process: the Ray one keeps a connection and cached handles, which
    is what makes a predict call cheap."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = _build()
        return _backend


def reset_backend() -> None:
    """Forget the backend (tests point the settings at another fleet)."""
    global _backend
    with _lock:
        close = getattr(_backend, "close", None)
        if close is not None:
            close()  # let go of its handles and sockets
        _backend = None


def _build() -> ServingBackend:
    if settings.SERVING_BACKEND == "sagemaker":
        from worker.serving.sagemaker import SageMakerFleet

        options: dict[str, Any] = settings.SAGEMAKER_OPTIONS
        return SageMakerFleet(**options)  # type: ignore[no-any-return,unused-ignore]
    from worker.serving.fleet import RayFleet

    return RayFleet(  # type: ignore[no-any-return,unused-ignore]
        address=settings.RAY_ADDRESS or None,
        namespace=settings.RAY_NAMESPACE,
        local_dir=settings.SERVING_LOCAL_DIR,
    )


def pool_spec(pool: ServingPool) -> PoolSpec:
    return PoolSpec(
        kind=pool.kind,
        replica_memory_bytes=pool.replica_memory_bytes,
        max_sets=pool.max_sets,
        tail_memory_bytes=pool.tail_memory_bytes,
        min_replicas=pool.min_replicas,
        max_replicas=pool.max_replicas,
    )
