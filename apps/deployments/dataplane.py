"""Predictions from web and Celery processes, without Ray.

The fleet controller (:mod:`apps.deployments.controller`) is the only process connected to
the serving backend. It publishes each pool's routing table on its :class:`ServingPool`
row: which deployment (replica set, or the long tail) holds each model, and the sockets of
that deployment's running replicas with their secrets (:mod:`worker.serving.fastpath`).
Here a process reads that table (cached for ``FLEET_ROUTES_TTL_SECONDS``, so a change
reaches it within a second or two) and sends the predict straight to a replica's socket.

Nothing here can hang or crash the caller: a replica that does not accept a connection
within ``PREDICT_CONNECT_TIMEOUT_SECONDS`` is skipped (and left alone for a few seconds),
and when no replica of the model answered the caller gets :class:`FleetUnavailable` (the
API's 503 with ``Retry-After``). With ``SERVING_BACKEND=sagemaker`` predicts go through
SageMaker's runtime API (boto3), which routes by itself.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings

from apps.core.errors import ServiceUnavailable
from apps.deployments.models import ServingPool
from worker.serving.fastpath import BadRequest, Endpoint, FastClient, FastPathUnavailable
from worker.serving.routing import IndexNotHere, ModelNotHere, tail_deployment
from worker.serving.specs import ModelLoadError, PredictResult

log = logging.getLogger(__name__)

# How long a replica socket that could not be reached is skipped.
UNREACHABLE_RETRY_S = 5.0
RETRY_AFTER_S = 2


class FleetUnavailable(ServiceUnavailable):
    """No replica of the model answered: the fleet is recovering, or unreachable from
    this host. The request changed nothing; try again shortly."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="model_unavailable")
        self.retry_after = RETRY_AFTER_S


class RoutedFleet:
    """Predict by the published routing table (one per process, thread-safe)."""

    def __init__(self) -> None:
        self._client = FastClient(connect_timeout_s=settings.PREDICT_CONNECT_TIMEOUT_SECONDS)
        self._tables: dict[str, tuple[float, dict[str, Any]]] = {}
        self._unreachable: dict[Endpoint, float] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def table(self, kind: str, *, refresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        cached = self._tables.get(kind)
        if cached is None or refresh or now - cached[0] > settings.FLEET_ROUTES_TTL_SECONDS:
            routes = ServingPool.objects.filter(kind=kind).values_list("routes", flat=True).first()
            cached = (now, routes or {})
            with self._lock:
                self._tables[kind] = cached
        return cached[1]

    def predict(self, kind: str, model_id: str, texts: list[str]) -> PredictResult:
        """Raises ModelLoadError (the replica cannot load it), FleetUnavailable."""
        started = time.perf_counter()
        reply, endpoint = self._send(
            kind,
            model_id,
            lambda endpoint: self._client.call(
                endpoint, model_id, texts, timeout_s=settings.PREDICT_TIMEOUT_SECONDS
            ),
        )
        return PredictResult(
            outputs=reply["outputs"],
            latency_ms=(time.perf_counter() - started) * 1000,
            replica_id=str(reply.get("replica_id", endpoint.replica_id)),
        )

    def embed(self, kind: str, model_id: str, texts: list[str], role: str) -> dict[str, Any]:
        """An embedding model's vectors (``{"embeddings", "dim", "replica_id",
        "latency_ms"}``); raises as :meth:`predict`, BadRequest."""
        return self._operate(
            kind, model_id, {"op": "embed", "model_id": model_id, "texts": texts, "role": role}
        )

    def search(
        self, kind: str, model_id: str, query: str, k: int, *, index: str = ""
    ) -> dict[str, Any]:
        """The best ``k`` documents of the model's index (``{"results", "index",
        "replica_id", "latency_ms"}``); raises as :meth:`predict`, IndexNotHere."""
        message = {"op": "search", "model_id": model_id, "query": query, "k": k, "index": index}
        return self._operate(kind, model_id, message)

    def complete(self, kind: str, model_id: str, **request: Any) -> dict[str, Any]:
        """An autocomplete model's completions (``{"completions", "cached_tokens",
        "replica_id", "latency_ms"}``; ``request`` as
        :meth:`worker.serving.ray_routing.RayRouting.complete` takes it); raises as
        :meth:`predict`, BadRequest."""
        message = {"op": "complete", "model_id": model_id, **request}
        # A session's calls go to one replica while the replicas stay: its cache is there.
        return self._operate(kind, model_id, message, affinity=str(request.get("session") or ""))

    def _operate(
        self, kind: str, model_id: str, message: dict[str, Any], *, affinity: str = ""
    ) -> dict[str, Any]:
        started = time.perf_counter()
        reply, endpoint = self._send(
            kind,
            model_id,
            lambda endpoint: self._client.request(
                endpoint, message, timeout_s=settings.PREDICT_TIMEOUT_SECONDS
            ),
            affinity=affinity,
        )
        reply.setdefault("replica_id", endpoint.replica_id)
        reply["latency_ms"] = (time.perf_counter() - started) * 1000
        return reply

    def _send(
        self,
        kind: str,
        model_id: str,
        call: Callable[[Endpoint], dict[str, Any]],
        *,
        affinity: str = "",
    ) -> tuple[dict[str, Any], Endpoint]:
        """``call`` on a replica of the model, by the routing table (see :meth:`predict`)."""
        deadline = time.monotonic() + settings.PREDICT_CONNECT_TIMEOUT_SECONDS
        why = "the fleet has published no route to it yet"
        for attempt in range(2):
            # A stale table (a replica gone, the model moved) is read again once.
            table = self.table(kind, refresh=attempt > 0)
            route = (table.get("models") or {}).get(model_id)
            if route is None:
                why = "the fleet does not hold it right now"
                continue
            endpoints = self._endpoints(kind, route["deployment"], model_id, table, affinity)
            if not endpoints:
                why = f"no replica of {route['deployment']} is running"
                continue
            # Replicas that just failed to connect are skipped for a few seconds: a host
            # that cannot reach the fleet answers 503 at once, not after a timeout each.
            now = time.monotonic()
            candidates = [
                e for e in endpoints if now - self._unreachable.get(e, -1e9) > UNREACHABLE_RETRY_S
            ]
            if not candidates:
                why = f"no replica of {route['deployment']} could be reached just now"
                break
            for tried, endpoint in enumerate(candidates):
                if tried and time.monotonic() > deadline:
                    break
                try:
                    reply = call(endpoint)
                except FastPathUnavailable as error:
                    self._unreachable[endpoint] = time.monotonic()
                    why = f"replica {endpoint.replica_id} did not answer ({error})"
                    continue
                except ModelNotHere:
                    why = "the model moved"
                    break
                except (ModelLoadError, IndexNotHere, BadRequest):
                    raise
                except Exception as error:  # the replica failed the request
                    why = f"replica {endpoint.replica_id} failed: {error}"
                    continue
                return reply, endpoint
        raise FleetUnavailable(f"The model is temporarily unavailable: {why}.")

    def _endpoints(
        self, kind: str, deployment: str, model_id: str, table: dict[str, Any], affinity: str = ""
    ) -> list[Endpoint]:
        """The deployment's replicas to try, in order: round robin over a set's; for the
        tail the same replica first for the same model, so it finds the model loaded; with
        an ``affinity`` (an autocomplete session) the same replica first for it."""
        endpoints = []
        for raw in (table.get("endpoints") or {}).get(deployment, []):
            try:
                endpoints.append(Endpoint(str(raw["host"]), int(raw["port"]),
                                          str(raw["secret"]), str(raw["replica_id"])))  # fmt: skip
            except (KeyError, TypeError, ValueError):
                continue
        if not endpoints:
            return []
        if affinity or deployment == tail_deployment(kind):
            # The tail's replica by model alone: one replica of the tail loads a model.
            tail = deployment == tail_deployment(kind)
            key = model_id if tail else f"{model_id}/{affinity}"
            start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
        else:
            start = next(self._turn)
        start %= len(endpoints)
        return endpoints[start:] + endpoints[:start]

    def prewarm(self) -> int:
        """Read every published table and open one connection to each replica, so a fresh
        process's first predict costs what its next ones do. Returns the connections made;
        never raises (a replica that does not answer now is skipped until it does)."""
        opened = 0
        for kind in ServingPool.objects.values_list("kind", flat=True):
            table = self.table(kind, refresh=True)
            for deployment in table.get("endpoints") or {}:
                for endpoint in self._endpoints(kind, deployment, "", table):
                    try:
                        self._client.give_back(endpoint, self._client.take(endpoint))
                    except FastPathUnavailable:
                        self._unreachable[endpoint] = time.monotonic()
                        continue
                    opened += 1
        return opened

    def prewarm_predict(self) -> bool:
        """One predict of "prewarm" by a published classifier (any; it only reads), so the
        fast path's encode, send and decode have run before a caller's; False when none
        answered (never raises)."""
        for kind in ServingPool.objects.values_list("kind", flat=True):
            table = self.table(kind)
            for model_id in table.get("models") or {}:
                try:
                    self.predict(kind, str(model_id), ["prewarm"])
                except Exception as error:  # not a classifier, not loaded: try the next
                    log.debug("prewarm predict of %s: %s", model_id, error)
                    continue
                return True
        return False

    def close(self) -> None:
        self._client.close()


_lock = threading.Lock()
_plane: Any = None


def data_plane() -> Any:
    """This process's predict path: the routed fleet, or SageMaker's runtime."""
    global _plane
    with _lock:
        if _plane is None:
            if settings.SERVING_BACKEND == "sagemaker":
                from worker.serving.sagemaker import SageMakerFleet

                options: dict[str, Any] = settings.SAGEMAKER_OPTIONS
                _plane = SageMakerFleet(**options)
            else:
                _plane = RoutedFleet()
        return _plane


def prewarm(application: Any = None, *, keep_connection: bool = False) -> None:
    """At a web or worker process's start: the URL resolver, the predict view and the
    routed fleet's connections, ready before the first request (best effort). Given the
    WSGI application, one request with a token that matches none also goes through the
    whole stack — middleware, DRF's authentication and its token query, renderers and
    error envelope, imported and built on first use — and is answered 401, changing
    nothing; then the predict path's other reads run once for a tenant and model that do
    not exist (their SQL built and cached, the statements prepared on this connection).

    ``keep_connection``: in the process that serves (a gunicorn worker after its fork,
    see ``workbench/gunicorn_conf.py``) the warmed database connection is kept — a new
    one would prepare every statement again. A server that forks after loading the
    application must not share it, so by default it is closed."""
    from django.urls import get_resolver

    try:
        get_resolver().url_patterns  # noqa: B018 (imports every view module)
        plane = data_plane()
        if isinstance(plane, RoutedFleet):
            plane.prewarm()
        _metrics_and_cache()
        # Several rounds: CPython specialises a function's bytecode only after it has run
        # a few times, and a first predict running it unspecialised is what a fresh
        # process's first caller would otherwise pay.
        for _ in range(PREWARM_ROUNDS):
            if application is not None:
                _request(application, "POST", "/api/v1/tenants/-/models/-/predict")
            _predict_reads()
            _predict_view_parts()
            if isinstance(plane, RoutedFleet):
                plane.prewarm_predict()
    except Exception:  # a database not migrated yet, nothing published: the first call pays
        log.debug("prewarm skipped", exc_info=True)
    finally:
        from django.db import connections

        if not keep_connection:
            connections.close_all()  # a forking server must not share this connection


# The data plane's routes whose request metric series a prewarm creates, and the statuses.
DATA_PLANE_PATHS = ("predict", "embed", "search", "complete")
DATA_PLANE_STATUSES = ("200", "400", "409", "503")


def _metrics_and_cache() -> None:
    """The request-duration series of the data plane's routes made (a series' first use
    writes its buckets into the multiprocess files: ~2 ms), and the cache the throttles
    count in connected."""
    from django.core.cache import cache
    from django.urls import resolve

    from apps.core.metrics import HTTP_REQUEST_SECONDS

    for name in DATA_PLANE_PATHS:
        route = resolve(f"/api/v1/tenants/-/models/-/{name}").route
        for status in DATA_PLANE_STATUSES:
            HTTP_REQUEST_SECONDS.labels(route, "POST", status)
    cache.get("prewarm")


# Rounds of the prewarm (see ``prewarm``): more than CPython's specialisation warm-up.
PREWARM_ROUNDS = 12


def _predict_view_parts() -> None:
    """What a successful predict runs after its reads: the input checked, an answer
    rendered."""
    from apps.core.renderers import FastJSONRenderer
    from apps.deployments.api import PredictInputSerializer

    checked = PredictInputSerializer(data={"inputs": ["prewarm"]})
    checked.is_valid()
    FastJSONRenderer().render(
        {"model_version": "-", "version": 1, "environment": "production",
         "outputs": [{"label": "-", "score": 0.5}], "latency_ms": 1.0}
    )  # fmt: skip


def _predict_reads() -> None:
    """The reads every predict makes after authentication, for ids no row has."""
    from apps.deployments import selectors
    from apps.registry.models import RegisteredModel
    from apps.tenants.models import Tenant
    from apps.tenants.scoping import membership_by_slug

    nobody = "-prewarm-"
    membership_by_slug(user_id=0, slug=nobody)
    tenant, model = Tenant(pk=nobody), RegisteredModel(pk=nobody)
    selectors.registered_model(tenant=tenant, name=nobody)
    selectors.serving_deployment(tenant=tenant, model=model, environment="production")


def _request(application: Any, method: str, path: str) -> str:
    """One request through ``application`` from inside the process; its status line."""
    import io
    import secrets

    from apps.core.context import PREWARM_ENVIRON_KEY

    hosts = [h.lstrip(".") for h in settings.ALLOWED_HOSTS if h.lstrip(".") not in ("", "*")]
    body = b'{"inputs": ["prewarm"]}'
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": "application/json",
        # A token no row has (random, never a real one): authentication runs its query.
        "HTTP_AUTHORIZATION": f"Bearer prewarm-{secrets.token_hex(16)}",
        "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": hosts[0] if hosts else "localhost",
        "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(), "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https" if settings.SECURE_SSL_REDIRECT else "http",
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        PREWARM_ENVIRON_KEY: True,
    }  # fmt: skip
    seen: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        seen.append(status)

    result = application(environ, start_response)
    try:
        for _ in result:
            pass
    finally:
        if hasattr(result, "close"):
            result.close()
    return seen[0] if seen else ""


def reset_data_plane() -> None:
    """Forget the data plane (tests point the settings at another fleet)."""
    global _plane
    with _lock:
        if _plane is not None and hasattr(_plane, "close"):
            _plane.close()
        _plane = None
