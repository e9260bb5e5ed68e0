"""What ``scripts/run.sh`` needs Python for: checking its ports, and leaving nothing behind.

    stack.py ports-free HOST PORT...     exit 1, naming the variable to change, if one is taken
    stack.py stop-ray                    stop this stack's Ray head(s)
    stack.py stop                        the same, then any straggler

Every process of one ``make run`` carries ``WORKBENCH_STACK_ID`` (run.sh exports it, a new
value each start, and every child inherits it, Ray's too), so this stack's processes are
found by their environment, never by name across the machine: another stack, another
user's Ray, the developer's own shells are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.serving import local_ray  # the repository is on sys.path only from here

STRAGGLER_GRACE_S = 5.0
# Ray's own graceful stop of a head that hosted Serve was seen taking over 20 s; past this
# its processes are SIGKILLed (nothing of the embedded head outlives the stack anyway).
HEAD_GRACE_S = 5.0


def ports_free(host: str, named_ports: list[str]) -> int:
    taken = []
    for item in named_ports:
        name, port = item.split("=", 1)
        with socket.socket() as sock:
            # As the servers bind: connections in TIME_WAIT from an earlier run don't count.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, int(port)))
            except OSError:
                taken.append(f"{name}={port}")
    if taken:
        print(
            f"run.sh: in use on {host}: {', '.join(taken)}. Another stack may be running: "
            "give this one other ports (PORT, MLFLOW_PORT, HUB_PORT, HUB_API_PORT, "
            "HUB_PROXY_API_PORT) and its own WORKBENCH_VAR_DIR.",
            file=sys.stderr,
        )
        return 1
    return 0


def processes(stack_id: str | None = None) -> dict[int, tuple[int, str]]:
    """pid → (session id, command line) of every live process carrying this stack's id
    (every process, without one); never this one or its parent (run.sh)."""
    marker = f"WORKBENCH_STACK_ID={stack_id}".encode()
    found: dict[int, tuple[int, str]] = {}
    me = {os.getpid(), os.getppid()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if stack_id is not None:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if marker not in fh.read().split(b"\0"):
                        continue
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            found[int(entry)] = (int(fields[3]), cmdline)
    return found


def stop_head(pid: int) -> None:
    started = time.monotonic()
    local_ray.stop_head(pid, timeout_s=HEAD_GRACE_S)
    # SIGKILLed processes take a moment to exit: wait for the head's session to empty, so
    # they are not taken for stragglers below.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(
        session == pid for session, _ in processes().values()
    ):
        time.sleep(0.1)
    print(f"run.sh: Ray head (pid {pid}) stopped in {time.monotonic() - started:.1f} s")


def stop_ray(stack_id: str, ray_dir: Path) -> None:
    # The head recorded in ray-head.json: its own session, so supervisord never stops it.
    # Only if that pid is still that head (its own --temp-dir): a file left by a stack that
    # was SIGKILLed may name a pid the kernel has since given to something else.
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        head = json.loads((ray_dir / local_ray.STATE_FILE).read_text())
        with open(f"/proc/{int(head['pid'])}/cmdline", "rb") as fh:
            argv = fh.read().decode(errors="replace").split("\0")
        if f"--temp-dir={head['temp_dir']}" in argv:
            stop_head(int(head["pid"]))
    # A head whose starter was interrupted before it could record it (Ctrl-C during
    # start-up, or a controller stopped mid-start) leads its own session too: stop it
    # the same way.
    for pid, (session, cmdline) in processes(stack_id).items():
        if session == pid and " start --head" in cmdline:
            stop_head(pid)


def stop(stack_id: str, ray_dir: Path) -> int:
    stop_ray(stack_id, ray_dir)
    # Anything else still here was left behind by a program that did not stop its
    # children: say so (it is a bug to fix), then stop it.
    stragglers = processes(stack_id)
    for pid, (_, cmdline) in stragglers.items():
        print(f"run.sh: left behind: pid {pid}: {cmdline[:200]}; stopping it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STRAGGLER_GRACE_S
    while stragglers and time.monotonic() < deadline:
        time.sleep(0.2)
        stragglers = {p: v for p, v in stragglers.items() if p in processes(stack_id)}
    for pid in stragglers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["ports-free"] and len(argv) >= 3:
        return ports_free(argv[1], argv[2:])
    stack_id, ray_dir = os.environ["WORKBENCH_STACK_ID"], Path(os.environ["SERVING_LOCAL_DIR"])
    if argv == ["stop-ray"]:
        stop_ray(stack_id, ray_dir)
        return 0
    if argv == ["stop"]:
        return stop(stack_id, ray_dir)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
