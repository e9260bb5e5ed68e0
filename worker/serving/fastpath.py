"""The replicas' own request socket: a predict without Ray's actor call.

Through Ray, a predict from a web worker to a replica is an actor call (task submission,
the replica's Serve request path, the object store for the reply): ~4 ms over the forward
pass on a 2-core machine, more than the whole budget the REST API has for its overhead.
So every replica also listens on a TCP socket of its own, served by its event loop and
calling the same ``predict`` (same batching, same counters), and publishes the address
with a per-replica secret in its statistics (Ray's GCS key-value store, which only the
cluster's members read). A driver (:class:`FastClient`) keeps a connection per replica
open and sends each predict as one frame; a round trip costs ~0.2 ms over the work.

Wire format: every message is a frame, a 4-byte big-endian length then that many bytes of
UTF-8 JSON (never pickle: this is a network port). A connection starts with
``{"secret": ...}`` (answered ``{"ok": true, "replica_id": ...}``, or closed on a wrong
secret); then, one at a time, ``{"model_id": ..., "texts": [...]}`` answered
``{"outputs": [...], "replica_id": ...}`` or ``{"error": <code>, "message": ...}`` with
code ``not_here`` (:class:`~worker.serving.routing.ModelNotHere`), ``load_error``
(:class:`~worker.serving.specs.ModelLoadError`), ``bad_request`` or ``internal``.

A frame with an ``op`` is another request than a classifier's predict (a predict frame has
none, exactly as before): ``{"op": "embed", "model_id", "texts", "role"}`` answered
``{"embeddings": [[...]], "dim", "replica_id"}``, and ``{"op": "search", "model_id",
"query", "k", "index"}`` (``index``: an index sha256, "" for the one the model serves)
answered ``{"results": [{"document_id", "title", "score"}], "index", "replica_id"}``; the
same error frames, plus ``index_not_here``
(:class:`~worker.serving.routing.IndexNotHere`). ``{"op": "complete", "model_id", "prefix",
"context", "max_tokens", "n", "strategy", "top_k", "seed", "session"}`` (an autocomplete
model) is answered ``{"completions": [{"text", "score"}], "cached_tokens", "replica_id"}``.
An unknown op is a ``bad_request``.

Serve does not see these requests, so the replica reports them to Serve's autoscaler
itself (``record_autoscaling_stats``, see :mod:`worker.serving.autoscaling`). Anything
that goes wrong with the socket (a replica gone, a port unreachable from this host) makes
the driver fall back to the Ray actor call: the socket is a shortcut, never the only way.

Light on purpose (no torch, no Ray): the web process imports it.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from worker.serving.routing import IndexNotHere, ModelNotHere
from worker.serving.specs import ModelLoadError

_LENGTH = struct.Struct(">I")
# Far above any predict (PREDICT_MAX_INPUTS x PREDICT_MAX_INPUT_CHARS is ~1 MB of text);
# a length beyond it is a stray client, not a request.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# How long a replica waits for a connection's secret before closing it, and the most it
# reads of a frame before the secret is known (a stranger must not make it hold megabytes).
HELLO_TIMEOUT_S = 5.0
MAX_HELLO_BYTES = 1024


class FrameError(ValueError):
    """A frame that is not a length-prefixed JSON object within MAX_FRAME_BYTES."""


class FastPathUnavailable(ConnectionError):
    """The replica's socket could not be used (gone, refused, closed mid-request): the
    caller falls back to the Ray actor call."""


class ReplicaError(RuntimeError):
    """The replica failed the request for a reason other than a missing or unloadable
    model (the message says which)."""


class BadRequest(ReplicaError, ValueError):
    """The replica refused the request as malformed (``bad_request``)."""


@dataclass(frozen=True)
class Endpoint:
    """Where a replica listens, as it publishes it."""

    host: str
    port: int
    secret: str
    replica_id: str

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> Endpoint | None:
        fast = stats.get("fast")
        if not isinstance(fast, dict):
            return None
        try:
            return cls(
                str(fast["host"]), int(fast["port"]), str(fast["secret"]), stats["replica_id"]
            )
        except (KeyError, TypeError, ValueError):
            return None


def encode(message: dict[str, Any]) -> bytes:
    # orjson: an embed's reply holds thousands of floats (a float32 array goes as it is, at
    # its own shortest repr), ~10x faster than the standard library's encoder both ways.
    body = orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = orjson.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise FrameError(f"not JSON: {error}") from error
    if not isinstance(message, dict):
        raise FrameError("a frame must hold a JSON object")
    return message


def _checked_length(header: bytes, limit: int = MAX_FRAME_BYTES) -> int:
    (length,) = _LENGTH.unpack(header)
    if length > limit:
        raise FrameError(f"frame of {length} bytes is over {limit}")
    return int(length)


# --- replica side -----------------------------------------------------------------------

Predict = Callable[[str, list[str]], Awaitable[dict[str, Any]]]
# A request with an ``op``: the whole frame in, the reply out.
Operation = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class FastServer:
    """The socket a replica serves predicts on (runs on the replica's event loop)."""

    def __init__(
        self,
        predict: Predict,
        *,
        replica_id: str,
        ops: Mapping[str, Operation] | None = None,
    ) -> None:
        self.predict = predict
        self.ops = dict(ops or {})
        self.replica_id = replica_id
        self.secret = os.urandom(24).hex()
        self.ongoing = 0  # requests being worked on: the replica's load for autoscaling
        self.requests = 0
        self._server: asyncio.Server | None = None
        self.host = ""
        self.port = 0

    async def start(self, host: str) -> None:
        self._server = await asyncio.start_server(self._connection, host=host, port=0)
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def published(self) -> dict[str, Any] | None:
        """What goes into the replica's statistics (None before :meth:`start`)."""
        if not self.port:
            return None
        return {"host": self.host, "port": self.port, "secret": self.secret}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hello = await asyncio.wait_for(_read(reader, MAX_HELLO_BYTES), HELLO_TIMEOUT_S)
            if hello is None or not hmac.compare_digest(str(hello.get("secret", "")), self.secret):
                return  # closed without a word: a stranger learns nothing
            writer.write(encode({"ok": True, "replica_id": self.replica_id}))
            while True:
                message = await _read(reader)
                if message is None:
                    return
                self.ongoing += 1
                try:
                    reply = await self._answer(message)
                finally:
                    self.ongoing -= 1
                    self.requests += 1
                writer.write(encode(reply))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, FrameError):
            return
        finally:
            writer.close()

    async def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op is not None:
            return await self._operation(op, message)
        model_id, texts = message.get("model_id"), message.get("texts")
        if (
            not isinstance(model_id, str)
            or not isinstance(texts, list)
            or not all(isinstance(t, str) for t in texts)
        ):
            return {
                "error": "bad_request",
                "message": "expected model_id (str), texts (list of str)",
            }
        try:
            return await self.predict(model_id, texts)
        except ModelNotHere as error:
            return {"error": "not_here", "message": str(error)}
        except ModelLoadError as error:
            return {"error": "load_error", "message": str(error)}
        except Exception as error:
            return {"error": "internal", "message": f"{type(error).__name__}: {error}"}

    async def _operation(self, op: object, message: dict[str, Any]) -> dict[str, Any]:
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None or not isinstance(message.get("model_id"), str):
            return {"error": "bad_request", "message": f"unknown op {op!r} or no model_id"}
        try:
            return await handler(message)
        except ModelNotHere as error:
            return {"error": "not_here", "message": str(error)}
        except IndexNotHere as error:
            return {"error": "index_not_here", "message": str(error)}
        except ModelLoadError as error:
            return {"error": "load_error", "message": str(error)}
        except (ValueError, TypeError) as error:
            return {"error": "bad_request", "message": str(error)}
        except Exception as error:
            return {"error": "internal", "message": f"{type(error).__name__}: {error}"}


async def _read(
    reader: asyncio.StreamReader, limit: int = MAX_FRAME_BYTES
) -> dict[str, Any] | None:
    """The next frame, or None when the peer closed between frames."""
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise
        return None
    return decode(await reader.readexactly(_checked_length(header, limit)))


# --- driver side ------------------------------------------------------------------------


class FastClient:
    """Open connections to replicas, reused across calls; safe to share between threads
    (a connection is used by one call at a time) and across a fork (a child opens its own)."""

    def __init__(self, *, connect_timeout_s: float = 2.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[Endpoint, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def call(
        self, endpoint: Endpoint, model_id: str, texts: list[str], *, timeout_s: float
    ) -> dict[str, Any]:
        """The replica's reply to one predict; raises ModelNotHere, ModelLoadError,
        ReplicaError, or FastPathUnavailable when the socket could not carry it."""
        return self.request(endpoint, {"model_id": model_id, "texts": texts}, timeout_s=timeout_s)

    def request(
        self, endpoint: Endpoint, message: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any]:
        """The replica's reply to one frame (a predict, or an ``op``); raises as
        :meth:`call` does, and IndexNotHere."""
        sock = self._take(endpoint)
        try:
            sock.settimeout(timeout_s)
            sock.sendall(encode(message))
            reply = _receive(sock)
        except (OSError, FrameError) as error:
            sock.close()
            raise FastPathUnavailable(f"replica {endpoint.replica_id}: {error}") from error
        self._give_back(endpoint, sock)
        code = reply.get("error")
        if code is None:
            return reply
        said = str(reply.get("message", ""))
        if code == "not_here":
            raise ModelNotHere(said)
        if code == "load_error":
            raise ModelLoadError(said)
        if code == "index_not_here":
            raise IndexNotHere(said)
        if code == "bad_request":
            raise BadRequest(f"{code}: {said}")
        raise ReplicaError(f"{code}: {said}")

    def forget(self, endpoint: Endpoint) -> None:
        with self._lock:
            for sock in self._idle.pop(endpoint, []):
                sock.close()

    def close(self) -> None:
        with self._lock:
            for socks in self._idle.values():
                for sock in socks:
                    sock.close()
            self._idle.clear()

    def take(self, endpoint: Endpoint) -> socket.socket:
        """An open connection to the replica (to hand back with :meth:`give_back`)."""
        return self._take(endpoint)

    def give_back(self, endpoint: Endpoint, sock: socket.socket) -> None:
        self._give_back(endpoint, sock)

    def _take(self, endpoint: Endpoint) -> socket.socket:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours
                self._idle, self._pid = {}, os.getpid()
            idle = self._idle.get(endpoint)
            if idle:
                return idle.pop()
        try:
            sock = socket.create_connection(
                (endpoint.host, endpoint.port), timeout=self.connect_timeout_s
            )
        except OSError as error:
            raise FastPathUnavailable(f"replica {endpoint.replica_id}: {error}") from error
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(encode({"secret": endpoint.secret}))
            hello = _receive(sock)
        except (OSError, FrameError) as error:
            sock.close()
            raise FastPathUnavailable(f"replica {endpoint.replica_id}: {error}") from error
        if hello.get("replica_id") != endpoint.replica_id:
            sock.close()  # the port now belongs to another replica (or process)
            raise FastPathUnavailable(f"replica {endpoint.replica_id} no longer listens there")
        return sock

    def _give_back(self, endpoint: Endpoint, sock: socket.socket) -> None:
        with self._lock:
            self._idle.setdefault(endpoint, []).append(sock)


def _receive(sock: socket.socket) -> dict[str, Any]:
    return decode(_receive_exactly(sock, _checked_length(_receive_exactly(sock, _LENGTH.size))))


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = sock.recv(min(count, 1 << 20))
        if not chunk:
            raise ConnectionResetError("the replica closed the connection")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)
