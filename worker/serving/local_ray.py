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

Each head listens on loopback only. ``--node-ip-address=127.0.0.1`` alone does not do it:
Ray on Linux takes a loopback node address for a mistake in a cluster of machines and
swaps in the host's external one, then listens on that address and on all interfaces (its
GCS, raylet, agents, client server, every worker's gRPC server and the replicas' request
sockets). Ray's own switch for single-machine clusters (``LOOPBACK_ENV``, named for macOS
and Windows, where it is the default) keeps 127.0.0.1, and Ray then binds only that. Every
process of the head and every driver needs it (a driver without it looks for the head at
the external address): :func:`start_head` and :func:`use_head_auth` set it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
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
logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
START_ATTEMPTS = 3
LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


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
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def short_temp_dir(key: str) -> Path:
    """``/tmp/rw-<hash of key>``: short enough for Ray's socket paths, one per key."""
    return Path("/tmp") / f"rw-{hashlib.sha256(key.encode()).hexdigest()[:10]}"  # noqa: S108


def head_command(
    *,
    port: int,
    temp_dir: Path,
    num_cpus: int,
    num_gpus: int | None,
    object_store_bytes: int,
) -> list[str]:
    """``ray start --head`` for a private head: every process of it on loopback (the node's
    address is 127.0.0.1, which Ray binds its GCS, raylet, agents, client server and the
    replicas' own sockets to), no dashboard and so no job API."""
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
        f"--port={port}", f"--node-ip-address={LOOPBACK}", f"--num-cpus={num_cpus}",
        f"--object-store-memory={object_store_bytes}", "--include-dashboard=false",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
        *(f"--{option}={value}" for option, value in ports.items()),
    ]  # fmt: skip
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    return command


def start_head(
    *,
    temp_dir: Path,
    log_path: Path,
    num_cpus: int = 4,
    num_gpus: int | None = None,
    object_store_bytes: int = 128 * 1024 * 1024,
) -> LocalRay:
    """Start ``ray start --head --block`` detached (own session) and wait for its GCS.

    A head whose ``ray start`` exited before it came up is started again, up to
    ``START_ATTEMPTS`` times: on a busy 2-core host the raylet kills itself when its
    dashboard agent (a Python process importing half of Ray) has not written its port
    within Ray's fixed 15 s, and a second try usually makes it. A head still not up at
    ``START_TIMEOUT_S`` is not tried again."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_head_once(
                temp_dir=temp_dir,
                log_path=log_path,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_bytes=object_store_bytes,
            )
        except _ExitedEarly:
            if attempt == START_ATTEMPTS:
                raise
            logger.warning("ray start --head exited before it came up (try %d); again", attempt)
            time.sleep(2.0 * attempt)
    raise AssertionError("unreachable")


class _ExitedEarly(RuntimeError):
    """``ray start --head`` exited before its head came up."""


def _start_head_once(
    *,
    temp_dir: Path,
    log_path: Path,
    num_cpus: int,
    num_gpus: int | None,
    object_store_bytes: int,
) -> LocalRay:
    port = free_port()
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = head_command(
        port=port,
        temp_dir=temp_dir,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_bytes=object_store_bytes,
    )
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
        **LOOPBACK_ENV,
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
    address = f"{LOOPBACK}:{port}"
    started = time.time()
    deadline = time.monotonic() + START_TIMEOUT_S
    # The head is up once the log says so (GCS and raylet both running).
    while "Ray runtime started" not in log_path.read_text(errors="replace"):
        exited = process.poll() is not None or _raylet_died(temp_dir, started)
        if exited or time.monotonic() > deadline:
            stop_head(process.pid)
            tail = log_path.read_text(errors="replace")[-3000:]
            error = _ExitedEarly if exited else RuntimeError
            raise error(f"ray start --head did not come up:\n{tail}")
        time.sleep(0.2)
    return LocalRay(
        address=address,
        pid=process.pid,
        temp_dir=str(temp_dir),
        log_path=str(log_path),
        token_path=str(token_path),
    )


# A raylet's fatal line: "[2026-12-02 05:58:46,111 C 6469 6469] (raylet) ... Check failed".
_FATAL = re.compile(r"^\[\S+ \S+ C \d+ \d+\]", re.MULTILINE)


def _raylet_died(temp_dir: Path, since: float) -> bool:
    """Whether this start's raylet failed a check and ended (``ray start`` itself would
    wait out ``RAY_raylet_start_wait_time_s`` for it)."""
    raylet_log = temp_dir / "session_latest" / "logs" / "raylet.out"
    try:
        if raylet_log.stat().st_mtime < since:
            return False  # an earlier start's
        return _FATAL.search(raylet_log.read_text(errors="replace")) is not None
    except OSError:
        return False


def _auth_env(token_path: str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


def use_head_auth(head: LocalRay) -> None:
    """Make this process (and the processes it starts) authenticate to ``head``, over
    loopback (see the module's docstring): call before ``ray.init``."""
    os.environ.update(_auth_env(head.token_path))
    os.environ.update(LOOPBACK_ENV)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    if "ray" in sys.modules:
        from worker.serving import ray_private

        ray_private.reload_auth()
        ray_private.keep_loopback()


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
