"""The replicas' request socket on its own (no Ray): a real FastServer on an event loop in a
thread, driven by the real FastClient. The predict behind the server is a small coroutine
here; the real replica's predict over this socket is tested on Ray in test_fleet.py."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from worker.serving.fastpath import (
    MAX_FRAME_BYTES,
    MAX_HELLO_BYTES,
    Endpoint,
    FastClient,
    FastPathUnavailable,
    FastServer,
    ReplicaError,
    encode,
)
from worker.serving.routing import ModelNotHere
from worker.serving.specs import ModelLoadError


async def _predict(model_id: str, texts: list[str]) -> dict[str, Any]:
    if model_id == "absent":
        raise ModelNotHere("model absent is not on app/set-0")
    if model_id == "broken":
        raise ModelLoadError("sha256 mismatch for broken")
    if model_id == "crash":
        raise ZeroDivisionError("division by zero")
    if model_id == "slow":
        await asyncio.sleep(0.2)
    outputs = [[{"label": text.upper(), "score": 1.0}] for text in texts]
    return {"outputs": outputs, "replica_id": "r-1"}


class Running:
    """A FastServer on its own event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = FastServer(_predict, replica_id="r-1")
        asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1"), self.loop).result(5)
        published = self.server.published()
        assert published is not None
        endpoint = Endpoint.from_stats({"replica_id": "r-1", "fast": published})
        assert endpoint is not None
        self.endpoint = endpoint

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()  # the open connections
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def running() -> Iterator[Running]:
    server = Running()
    yield server
    server.stop()


def test_a_predict_crosses_the_socket_and_the_connection_is_reused(running: Running) -> None:
    client = FastClient()
    first = client.call(running.endpoint, "m", ["hello", "bye"], timeout_s=5)
    assert first == {
        "outputs": [[{"label": "HELLO", "score": 1.0}], [{"label": "BYE", "score": 1.0}]],
        "replica_id": "r-1",
    }
    for _ in range(20):
        client.call(running.endpoint, "m", ["again"], timeout_s=5)
    assert running.server.requests == 21
    assert len(client._idle[running.endpoint]) == 1  # one connection carried all of them
    client.close()


def test_the_replicas_errors_come_back_as_the_drivers_exceptions(running: Running) -> None:
    client = FastClient()
    with pytest.raises(ModelNotHere, match="absent is not on"):
        client.call(running.endpoint, "absent", ["x"], timeout_s=5)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        client.call(running.endpoint, "broken", ["x"], timeout_s=5)
    with pytest.raises(ReplicaError, match="internal: ZeroDivisionError"):
        client.call(running.endpoint, "crash", ["x"], timeout_s=5)
    # An error answer leaves the connection usable.
    assert client.call(running.endpoint, "m", ["ok"], timeout_s=5)["outputs"]
    assert len(client._idle[running.endpoint]) == 1


def test_a_wrong_secret_is_refused_without_an_answer(running: Running) -> None:
    wrong = Endpoint(running.endpoint.host, running.endpoint.port, "0" * 48, "r-1")
    with pytest.raises(FastPathUnavailable, match="closed the connection"):
        FastClient().call(wrong, "m", ["x"], timeout_s=5)
    # Before the secret, a frame longer than a hello is not even read.
    with socket.create_connection((running.endpoint.host, running.endpoint.port), 5) as raw:
        raw.sendall(struct.pack(">I", MAX_HELLO_BYTES + 1))
        raw.settimeout(5)
        assert raw.recv(4096) == b""
    assert running.server.requests == 0


def test_a_malformed_request_is_answered_bad_request_and_garbage_closes_the_connection(
    running: Running,
) -> None:
    with pytest.raises(ReplicaError, match="bad_request"):
        FastClient().call(running.endpoint, "m", [1, 2], timeout_s=5)  # type: ignore[list-item]
    with socket.create_connection((running.endpoint.host, running.endpoint.port), 5) as raw:
        raw.sendall(encode({"secret": running.endpoint.secret}))
        raw.recv(4096)  # the hello
        raw.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))
        raw.settimeout(5)
        assert raw.recv(4096) == b""  # closed, nothing read beyond the header


def test_a_replica_that_went_away_raises_unavailable_so_the_caller_falls_back() -> None:
    server = Running()
    client = FastClient()
    client.call(server.endpoint, "m", ["x"], timeout_s=5)
    server.stop()  # the listening socket closes; the idle connection dies with the loop
    with pytest.raises(FastPathUnavailable):
        client.call(server.endpoint, "m", ["x"], timeout_s=5)
    with pytest.raises(FastPathUnavailable):
        client.call(server.endpoint, "m", ["x"], timeout_s=5)  # a new connection is refused


def test_the_replica_counts_requests_in_flight_for_the_autoscaler(running: Running) -> None:
    client = FastClient()
    seen: list[int] = []

    def watch() -> None:
        for _ in range(40):
            seen.append(running.server.ongoing)
            threading.Event().wait(0.005)

    with ThreadPoolExecutor(5) as pool:
        watcher = pool.submit(watch)
        calls = [
            pool.submit(client.call, running.endpoint, "slow", ["x"], timeout_s=5) for _ in range(4)
        ]
        assert all(c.result()["outputs"] for c in calls)
        watcher.result()
    assert max(seen) == 4  # four threads, four connections, four requests at once
    assert running.server.ongoing == 0


def test_a_forked_child_opens_its_own_connections(running: Running) -> None:
    client = FastClient()
    client.call(running.endpoint, "m", ["x"], timeout_s=5)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must not share the parent's socket
        try:
            reply = client.call(running.endpoint, "m", ["child"], timeout_s=5)
            ok = reply["outputs"][0][0]["label"] == "CHILD"
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert (
        client.call(running.endpoint, "m", ["parent"], timeout_s=5)["outputs"][0][0]["label"]
        == "PARENT"
    )
    assert running.server.requests == 3
