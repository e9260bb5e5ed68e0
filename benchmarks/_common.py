"""What every benchmark here shares: machine facts, process trees, the README entry."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
from argparse import ArgumentParser, Namespace
from collections.abc import Callable
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"
RESULTS_MARKER = "<!-- results: newest first; the benchmark inserts new entries below -->"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):  # kernel without the file
        return _children_by_scan(pid)
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids.extend(int(k) for k in fh.read().split())
    return kids


def _children_by_scan(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as fh:
                # the parent pid is the 2nd field after the ")" that closes the command name
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(_children(pid))
    return tree


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def gpu() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none"
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "; ".join(out.stdout.strip().splitlines()) or "none"


def commit() -> str:
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        return "uncommitted"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def record(entry: str, *, intro: str = "# Benchmarks\n") -> None:
    """Insert ``entry`` at the top of the results in README.md (newest first)."""
    text = README.read_text(encoding="utf-8") if README.exists() else intro
    if RESULTS_MARKER not in text:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{RESULTS_MARKER}\n"
    head, _, rest = text.partition(RESULTS_MARKER)
    README.write_text(
        f"{head}{RESULTS_MARKER}\n\n{entry}\n{rest.lstrip(chr(10))}", encoding="utf-8"
    )


class Process:
    """A subprocess in its own process group, logging to a file, stopped with its group."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.command, self.env, self.log_path = name, command, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends exactly it
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def add_record_flags(parser: ArgumentParser) -> None:
    """``--record`` / ``--no-record``: whether the table goes into benchmarks/README.md
    (default: the full run records, ``--quick`` does not)."""
    rec = parser.add_mutually_exclusive_group()
    rec.add_argument(
        "--record",
        dest="record",
        action="store_true",
        default=None,
        help="prepend the table to benchmarks/README.md (default for the full run)",
    )
    rec.add_argument("--no-record", dest="record", action="store_false")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that clean up


def launch(
    parser: ArgumentParser, args: Namespace, run: Callable[[Namespace], int], *, data: Path
) -> int:
    """The end of a benchmark's ``main``: settle ``--record``, check the data file, make
    SIGTERM and SIGHUP clean up like Ctrl-C does, run."""
    if args.record is None:
        args.record = not args.quick
    if not data.is_file():
        parser.error(f"{data} not found (set BANKING77_TRAIN_CSV)")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    return run(args)
