"""An embedded Ray head whose ``ray start`` and GCS run on while its raylet is gone (seen:
the raylet crashed at start on a loaded machine) cannot be joined by any driver: the fleet's
connection counts it as lost and stops it, so that its next connect starts a new head.

The head here is a stand-in with the same shape, real processes: a ``ray start``-like
parent leading its own session, a child whose process name is ``raylet``, and a listening
socket for its GCS port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.serving import local_ray
from worker.serving.ray_connection import RayConnection


@pytest.fixture
def stand_in_head(tmp_path: Path) -> Iterator[tuple[local_ray.LocalRay, int]]:
    raylet = tmp_path / "raylet"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", raylet)
    gcs = socket.socket()
    gcs.bind(("127.0.0.1", 0))
    gcs.listen()
    parent = subprocess.Popen(
        ["sh", "-c", f"{raylet} 600 & exec sleep 600"], start_new_session=True
    )  # fmt: skip
    deadline = time.monotonic() + 10
    children: list[int] = []
    while not children and time.monotonic() < deadline:
        children = [
            p for p in local_ray._descendants(parent.pid)
            if Path(f"/proc/{p}/comm").read_text().strip() == "raylet"
        ]  # fmt: skip
        time.sleep(0.05)
    assert children, "the stand-in raylet did not start"
    head = local_ray.LocalRay(
        address=f"127.0.0.1:{gcs.getsockname()[1]}", pid=parent.pid,
        temp_dir=str(tmp_path / "ray-tmp"), log_path=str(tmp_path / "head.log"),
        token_path=str(tmp_path / "token"),
    )  # fmt: skip
    (tmp_path / local_ray.STATE_FILE).write_text(json.dumps(head.__dict__))
    try:
        yield head, children[0]
    finally:
        gcs.close()
        local_ray.stop_head(parent.pid, timeout_s=5)


def test_a_head_whose_raylet_died_is_lost_and_stopped(tmp_path, stand_in_head):
    head, raylet = stand_in_head
    connection = RayConnection(address=None, local_dir=tmp_path)
    assert not connection.lost()  # running, GCS answering, raylet up: joinable

    os.kill(raylet, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not connection.lost() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connection.lost()
    assert local_ray.is_alive(head)  # what the GCS port alone would have said

    connection._stop_broken_head()
    assert not local_ray._alive(head.pid)


def test_a_head_with_its_raylet_is_left_alone(tmp_path, stand_in_head):
    head, _ = stand_in_head
    RayConnection(address=None, local_dir=tmp_path)._stop_broken_head()
    assert local_ray.is_alive(head)
