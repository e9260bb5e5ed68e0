"""Every use of Ray's private APIs, in one module, for the Ray version they were written for.

The fleet (:mod:`worker.serving.fleet` and its parts) and the replicas
(:mod:`worker.serving.app`) use Ray's public API (``ray.init``, ``serve.run``,
``serve.get_deployment_handle``, named actors, ``record_autoscaling_stats``) wherever it
does the job. What it cannot do is here, each with why:

- a driver that must never start a Ray cluster of its own (:func:`disable_auto_connect`);
- a deployment's code version pinned, so a new configuration reconfigures replicas rather
  than restarting them (:func:`pin_code_version`);
- the request metadata Serve's router sends with a call to a replica's ``handle_request``
  (the Ray fallback of the direct path, :func:`request_metadata`);
- replicas' statistics in the GCS key-value store (:func:`kv_put` and the others): Serve
  has no public per-replica custom status;
- re-reading the auth token of a head a process switches to (:func:`reload_auth`), and
  keeping the node's loopback address for a process that imported Ray before it joined an
  embedded head (:func:`keep_loopback`).

:func:`check_version` runs when a driver connects and when a replica starts: a Ray other
than the one these were written for fails there, loudly, instead of somewhere deep in a
reconcile. An upgrade means re-running tests/worker/serving (real Ray) and moving
``WRITTEN_FOR``.
"""

from __future__ import annotations

from typing import Any

WRITTEN_FOR = "2.60.0"


def check_version() -> None:
    import ray

    if ray.__version__ != WRITTEN_FOR:
        raise RuntimeError(
            f"worker.serving uses private APIs of Ray {WRITTEN_FOR}; this is Ray "
            f"{ray.__version__}: pin ray=={WRITTEN_FOR} or update worker/serving/ray_private.py"
        )


def disable_auto_connect() -> None:
    """Ray starts a new local cluster (in the shared /tmp/ray) whenever a Ray call is made
    while disconnected, e.g. by Serve's background threads after a shutdown."""
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False


def pin_code_version(deployment: Any, version: str) -> None:
    """``serve.run`` picks a random code version per call unless the deployment has one;
    a new one restarts every replica."""
    deployment._version = version


def request_metadata(*, app: str, model_id: str, method: str = "predict") -> bytes:
    import pickle
    import uuid

    from ray.serve._private.common import RequestMetadata

    request_id = uuid.uuid4().hex
    return pickle.dumps(
        RequestMetadata(
            request_id=request_id,
            internal_request_id=request_id,
            call_method=method,
            app_name=app,
            multiplexed_model_id=model_id,
        )
    )


def kv_list(prefix: str) -> list[str]:
    from ray.experimental import internal_kv

    return [
        key.decode() if isinstance(key, bytes) else str(key)
        for key in internal_kv._internal_kv_list(prefix)
    ]


def kv_get(key: str) -> bytes | None:
    from ray.experimental import internal_kv

    value: bytes | None = internal_kv._internal_kv_get(key)
    return value


def kv_put(key: str, value: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True)


def kv_del(key: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key)


def reload_auth() -> None:
    """Ray reads the auth mode and token once per process: make it read them again."""
    from ray._raylet import (  # type: ignore[attr-defined]
        AuthenticationTokenLoader,
        Config,
    )

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def keep_loopback() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (``local_ray.LOOPBACK_ENV``) once, at
    import, into the constant that decides whether a loopback address is swapped for the
    host's external one: set the constant too, for a process that imported Ray first."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
