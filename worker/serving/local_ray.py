"""A private, local Ray head for the embedded stack and the tests.

``ray start --head --block`` runs in its own session: every Ray process it starts (GCS,
raylet, workers, the Serve controller and replicas) is its descendant and shares its fate
(the kernel kills them when it dies), so stopping it stops exactly this Ray and nothing
else. ``ray stop`` is never used: it stops every Ray on the machine, other users' too.

Each head gets its own ``--temp-dir`` (sessions, sockets, logs) under a short path: the
Unix sockets inside must fit the 107-byte limit.

Each head also gets its own authentication token (``RAY_AUTH_MODE=token`` with a private
``RAY_AUTH_TOKEN_PATH``): left alone, Ray enables token auth with ``~/.ray/auth_token``, a
file any other Ray user on the machine may create or replace. A driver connecting to the
head calls :func:`use_head_auth` first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "ray-head.json"
LOCK_FILE = "ray-head.lock"
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LocalRay:
    """A running head: its GCS address, the ``ray start`` process id, its temp dir."""

    address: str
    pid: int
    temp_dir: str
    log_path: str
    token_path: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_temp_dir(key: str) -> Path:
    """``/tmp/rw-<hash of key>``: short enough for Ray's socket paths, one per key."""
    return Path("/tmp") / f"rw-{hashlib.sha256(key.encode()).hexdigest()[:10]}"  # noqa: S108


def start_head(
    *,
    temp_dir: Path,
    log_path: Path,
    num_cpus: int = 4,
    num_gpus: int | None = None,
    object_store_bytes: int = 128 * 1024 * 1024,
) -> LocalRay:
    """Start ``ray start --head --block`` detached (own session) and wait for its GCS."""
    port = free_port()
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ray_cli = Path(sys.executable).with_name("ray")
    # Every port a head listens on is picked free here: Ray's fixed defaults (10001 for
    # the client server, 8265, 52365, ...) collide with other Rays on the same machine.
    ports = {
        option: free_port()
        for option in (
            "ray-client-server-port", "dashboard-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        )
    }  # fmt: skip
    command = [
        str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
        f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
        f"--object-store-memory={object_store_bytes}", "--include-dashboard=false",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
        *(f"--{option}={value}" for option, value in ports.items()),
    ]  # fmt: skip
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    token_path = temp_dir / "auth_token"
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Replicas report their load for autoscaling (RayFleet calls them directly).
        "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0",
        # A busy 2-core host can take over Ray's default 60 s to register the raylet.
        "RAY_raylet_start_wait_time_s": os.environ.get("RAY_raylet_start_wait_time_s", "180"),  # noqa: SIM112 (Ray's own name)
        **_auth_env(str(token_path)),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    # The head is up once the log says so (GCS and raylet both running).
    while "Ray runtime started" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_head(process.pid)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ray start --head did not come up:\n{tail}")
        time.sleep(0.2)
    return LocalRay(
        address=address,
        pid=process.pid,
        temp_dir=str(temp_dir),
        log_path=str(log_path),
        token_path=str(token_path),
    )


def _auth_env(token_path: str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


def use_head_auth(head: LocalRay) -> None:
    """Make this process (and the processes it starts) authenticate to ``head``: call
    before ``ray.init``."""
    os.environ.update(_auth_env(head.token_path))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    if "ray" in sys.modules:
        from worker.serving import ray_private

        ray_private.reload_auth()


def is_alive(head: LocalRay) -> bool:
    """The ``ray start`` process still runs and its GCS port accepts connections."""
    try:
        os.kill(head.pid, 0)
    except OSError:
        return False
    host, port = head.address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def stop_head(pid: int, *, timeout_s: float = 30.0) -> None:
    """Stop the head started as ``pid`` and every process below it, nothing else."""
    tree = _descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in [pid, *tree]):
        time.sleep(0.2)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    for leftover in [pid, *tree, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leftover, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def ensure_head(local_dir: Path, *, num_cpus: int = 4, num_gpus: int | None = None) -> LocalRay:
    """The head recorded under ``local_dir`` if it still runs, else a new one (recorded).

    A file lock makes concurrent callers (web and Celery processes) share one head.
    """
    local_dir.mkdir(parents=True, exist_ok=True)
    with (local_dir / LOCK_FILE).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = local_dir / STATE_FILE
        if state.exists():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                head = LocalRay(**json.loads(state.read_text()))
                if is_alive(head):
                    return head
        head = start_head(
            temp_dir=short_temp_dir(str(local_dir.resolve())),
            log_path=local_dir / "ray-head.log",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )
        state.write_text(json.dumps(asdict(head)))
        return head


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (by parent pid) or in its session (``root`` leads the
    session it was started in, so processes re-parented to init are found too)."""
    parents: dict[int, list[int]] = {}
    session: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                parents.setdefault(int(fields[1]), []).append(int(entry))
                if int(fields[3]) == root and int(entry) != root:
                    session.append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(set(found) | set(session))
