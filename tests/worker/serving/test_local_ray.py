"""The embedded Ray head: started once per local dir, reused, on loopback only, stopped
without leftovers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sockets import not_on_loopback
from worker.serving import local_ray
from worker.serving.fleet import RayFleet

ROOT = Path(__file__).resolve().parents[3]


def test_without_a_running_head_nothing_starts_and_nothing_is_served(tmp_path: Path) -> None:
    fleet = RayFleet(address=None, local_dir=tmp_path)
    assert fleet.status() == {"pools": []}
    with pytest.raises(KeyError):
        fleet.predict("classifier", "mv-1", ["hello"])
    assert fleet.wait_ready("classifier", ["mv-1"], timeout_s=1) == {"mv-1": "no fleet running"}
    assert not (tmp_path / local_ray.STATE_FILE).exists()


# A driver as the fleet's connection joins an embedded head: Ray imported first, then the
# head's auth (and loopback) taken, then ray.init; it reports, then waits on stdin.
DRIVER = """
import json, os, sys
import ray
from worker.serving import local_ray
head = local_ray.LocalRay(**json.loads(sys.argv[1]))
local_ray.use_head_auth(head)
ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
print(json.dumps({"pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                  "nodes": [n["NodeManagerAddress"] for n in ray.nodes()]}), flush=True)
sys.stdin.read()
"""


def commands(pids: list[int]) -> dict[int, str]:
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
            found[pid] = fh.read().replace(b"\0", b" ").decode(errors="replace")
    return found


def test_a_head_is_started_once_reused_and_stopped_whole(tmp_path: Path) -> None:
    head = local_ray.ensure_head(tmp_path / "ray", num_cpus=1)
    try:
        assert local_ray.is_alive(head)
        assert local_ray.ensure_head(tmp_path / "ray", num_cpus=1) == head  # reused
        processes = local_ray._descendants(head.pid)
        assert len(processes) >= 2  # at least the GCS server and the raylet
        assert Path(head.token_path).read_text() != ""

        # A driver joins it over loopback; then nothing of the head, the driver or the
        # workers started for it listens beyond loopback (Ray left alone listened on the
        # host's external address and on every interface).
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(dataclasses.asdict(head))],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert driver.stdout is not None and driver.stdin is not None
            joined = json.loads(driver.stdout.readline() or "{}")
            assert joined["node"] == "127.0.0.1" and joined["nodes"] == ["127.0.0.1"], joined
            processes = local_ray._descendants(head.pid)
            assert not_on_loopback(commands([*processes, head.pid, joined["pid"]])) == {}
        finally:
            if driver.stdin is not None:
                driver.stdin.close()
            driver.wait(timeout=60)
    finally:
        local_ray.stop_head(head.pid)
    assert not local_ray.is_alive(head)
    assert [p for p in processes if local_ray._alive(p)] == []


def test_a_raylet_that_failed_its_start_is_seen_at_once_and_an_earlier_ones_is_not(
    tmp_path: Path,
) -> None:
    # What a raylet writes when its dashboard agent missed Ray's 15 s on a busy host:
    # ``ray start`` itself would wait minutes for it; the start is tried again instead.
    logs = tmp_path / "session_2026-12-02_05-58-14" / "logs"
    logs.mkdir(parents=True)
    (tmp_path / "session_latest").symlink_to(logs.parent)
    raylet = logs / "raylet.out"
    raylet.write_text("[2026-12-02 05:58:30,967 I 6469 6494] (raylet) Monitor agent C x\n")
    assert not local_ray._raylet_died(tmp_path, since=0.0)
    with raylet.open("a") as fh:
        fh.write(
            "[2026-12-02 05:58:46,111 C 6469 6469] (raylet) node_manager.cc:3588: "
            "Check failed: Timed out waiting for file .../dashboard_agent_listen_port\n"
        )
    assert local_ray._raylet_died(tmp_path, since=0.0)
    assert not local_ray._raylet_died(tmp_path, since=raylet.stat().st_mtime + 1)
    assert not local_ray._raylet_died(tmp_path / "nothing", since=0.0)
