"""``make run``'s stack supervises itself and stops cleanly (scripts/run.sh, supervisord).

Each case runs the real run script as a developer's second stack would: its own
``WORKBENCH_VAR_DIR`` and free ports, nothing else from this machine's environment (no
``DATABASE_URL``, broker or ``RAY_ADDRESS`` of the test run), so it runs beside any other
stack. It SIGKILLs one supervised process and expects it back (and logged), then stops the
script the way a developer does and expects it to return promptly, having stopped every
process of that stack, its Ray head included, and freed its ports.

A process belongs to the stack when it carries the stack's ``WORKBENCH_VAR_DIR`` in its
environment (every process the script starts inherits it, Ray's too) or sits in the
script's session: never by name across the machine.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sockets import not_on_loopback

ROOT = Path(__file__).resolve().parents[1]
SUPERVISORCTL = ROOT / ".venv" / "bin" / "supervisorctl"
START_TIMEOUT_S = 240.0  # migrate + seed on a fresh database, then every program's imports
# The longest stopwaitsecs (the worker's 20 s, then SIGKILL); the Ray head stops meanwhile.
STOP_BOUND_S = 30.0
# The fleet controller is supervised like the rest, but its own tests cover it: whether it
# runs, fails or is given up, the rest of the stack must not care, so it is left out of
# "every program runs" and "stopped by its stop signal".
NOT_REQUIRED = {"fleet-controller"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(port: int) -> bool:
    """Someone listens there (connections left in TIME_WAIT don't stop a server binding)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    var_dir: Path
    ports: dict[str, int]
    output: Path

    @property
    def conf(self) -> Path:
        return self.var_dir / "supervisor" / "supervisord.conf"

    @property
    def supervisor_log(self) -> str:
        return (self.var_dir / "log" / "supervisord.log").read_text(errors="replace")

    def tail(self) -> str:
        text = self.output.read_text(errors="replace")[-4000:]
        with contextlib.suppress(OSError):
            text += "\n--- supervisord.log ---\n" + self.supervisor_log[-3000:]
        return text

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert self.process.poll() is None, (
                f"run.sh exited while waiting for {what}:\n{self.tail()}"
            )
            assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s:\n{self.tail()}"
            time.sleep(0.5)

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.ports['PORT']}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def programs(self) -> dict[str, tuple[str, int]]:
        """name → (state, pid) as ``supervisorctl status`` reports them."""
        result = subprocess.run(
            [str(SUPERVISORCTL), "-c", str(self.conf), "status"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        found = {}
        for line in result.stdout.splitlines():
            match = re.match(r"workbench:(\S+)\s+(\S+)(?:\s+pid (\d+))?", line)
            if match:
                found[match[1]] = (match[2], int(match[3] or 0))
        return found

    def running(self, name: str) -> int:
        state, pid = self.programs().get(name, ("", 0))
        return pid if state == "RUNNING" else 0

    def ray_head_pid(self) -> int:
        state = self.var_dir / "ray" / "ray-head.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads(state.read_text())["pid"])
        return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_of(stack: Stack, session: int) -> dict[int, str]:
    """pid → command line of each live process of this stack (see the module docstring)."""
    marker = f"WORKBENCH_VAR_DIR={stack.var_dir}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                ours = marker in fh.read().split(b"\0")
            if ours or int(fields[3]) == session:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    found[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
    return found


def print_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/run.sh", "--print-config"],
        cwd=ROOT,
        env={
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "LANG": "C.UTF-8",
            "WORKBENCH_VAR_DIR": str(tmp_path / "var"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_server_of_the_embedded_stack_is_given_loopback_even_when_host_says_otherwise(
    tmp_path: Path,
) -> None:
    ports = {"PORT": "18400", "MLFLOW_PORT": "18401", "HUB_API_PORT": "18402"}
    ports["HUB_PROXY_API_PORT"] = "18403"
    # HOST is set in many environments (containers, CI, some shells); run.sh used to honour it.
    result = print_config(tmp_path, HOST="0.0.0.0", **ports)  # noqa: S104
    assert result.returncode == 0, result.stderr
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(result.stdout)
    programs = {
        name.removeprefix("program:"): shlex.split(conf[name]["command"])
        for name in conf.sections()
        if name.startswith("program:")
    }
    # Each program is here because the checks below cover it: a new one needs its own.
    assert set(programs) == {"mlflow", "worker", "beat", "web", "jupyterhub", "fleet-controller"}
    mlflow = programs["mlflow"]
    assert mlflow[1:2] == ["server"]
    assert mlflow[mlflow.index("--host") + 1] == "127.0.0.1"
    assert mlflow[mlflow.index("--port") + 1] == ports["MLFLOW_PORT"]
    web = programs["web"]
    assert web[web.index("runserver") + 1] == f"127.0.0.1:{ports['PORT']}"
    # The hub binds loopback itself (test_notebooks_config covers what it builds).
    hub = programs["jupyterhub"]
    assert hub[1:3] == ["manage.py", "jupyterhub"]
    assert hub[hub.index("--hub-port") + 1] == ports["HUB_API_PORT"]
    assert hub[hub.index("--proxy-api-port") + 1] == ports["HUB_PROXY_API_PORT"]
    # The worker, beat and the fleet controller serve nothing (the broker is a file); the
    # controller's Ray head is started on loopback (the next test).
    for name in ("worker", "beat"):
        assert programs[name][1:4] == ["-A", "workbench", name]
    assert programs["fleet-controller"][1:] == ["manage.py", "fleet_controller"]
    # supervisord itself listens on a Unix socket only.
    assert "inet_http_server" not in conf
    assert conf["unix_http_server"]["file"].startswith("/")
    # --print-config started nothing and wrote nothing.
    assert not (tmp_path / "var").exists()


def test_the_embedded_ray_head_is_started_on_loopback_without_a_dashboard(tmp_path: Path) -> None:
    from worker.serving import local_ray

    command = local_ray.head_command(
        port=6380, temp_dir=tmp_path, num_cpus=2, num_gpus=None, object_store_bytes=1 << 27
    )
    assert command[1:4] == ["start", "--head", "--block"]
    # The node's address is the one Ray binds its GCS, raylet, agents and client server to,
    # and the one each Serve replica opens its request socket on.
    assert "--node-ip-address=127.0.0.1" in command
    assert "--include-dashboard=false" in command  # no dashboard, so no job API
    assert not [part for part in command if "-host" in part and "127.0.0.1" not in part]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    names = ("PORT", "MLFLOW_PORT", "HUB_PORT", "HUB_API_PORT", "HUB_PROXY_API_PORT")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    var_dir = tmp_path / "var"
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "WORKBENCH_VAR_DIR": str(var_dir),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        **{name: str(port) for name, port in ports.items()},
    }
    output = tmp_path / "run.out"
    with output.open("wb") as out:
        # Its own session, as a terminal gives `make run` its own process group.
        process = subprocess.Popen(
            ["bash", "scripts/run.sh"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Stack(process=process, var_dir=var_dir, ports=ports, output=output)
    try:
        yield running
    finally:
        # Only when a case failed half-way: leave nothing running for the next one.
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_BOUND_S)
        for pid in processes_of(running, process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.mark.parametrize(
    ("victim", "stop_signal", "to_group"),
    [
        # Ctrl-C in a terminal: SIGINT to make's whole process group.
        pytest.param("web", signal.SIGINT, True, id="web-killed-then-ctrl-c"),
        # `kill <pid>` of the run command (what make forwards on SIGTERM).
        pytest.param("beat", signal.SIGTERM, False, id="beat-killed-then-sigterm"),
    ],
)
def test_a_killed_process_is_restarted_and_the_stop_leaves_nothing_behind(
    stack: Stack, victim: str, stop_signal: signal.Signals, to_group: bool
) -> None:
    started = time.monotonic()
    stack.wait_for("/healthz", stack.healthy, START_TIMEOUT_S)
    print(f"\n/healthz answered {time.monotonic() - started:.1f} s after `run.sh` started")
    expected = {"mlflow", "worker", "beat", "web", "jupyterhub"}
    stack.wait_for(
        f"{sorted(expected)} all RUNNING",
        lambda: all(stack.running(name) for name in expected),
        60,
    )
    assert set(stack.programs()) == expected | NOT_REQUIRED
    stack.wait_for(
        "the Ray head recorded in ray/ray-head.json", lambda: stack.ray_head_pid() > 0, 120
    )
    head = stack.ray_head_pid()
    assert alive(head)
    # Every socket the stack listens on, Ray's and the hub's proxy's included, is loopback.
    assert not_on_loopback(processes_of(stack, stack.process.pid)) == {}

    # A supervised process dies: supervisord starts it again and says so; the stack stays.
    old = stack.running(victim)
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    stack.wait_for(f"{victim} restarted", lambda: stack.running(victim) not in (0, old), 60)
    print(f"{victim} SIGKILLed: RUNNING again after {time.monotonic() - killed_at:.1f} s")
    new = stack.running(victim)
    log = stack.supervisor_log
    exited = log.index(f"exited: {victim} (terminated by SIGKILL; not expected)")
    assert f"spawned: '{victim}' with pid {new}" in log[exited:]
    stack.wait_for("/healthz after the restart", stack.healthy, 60)
    assert stack.process.poll() is None
    assert all(stack.running(name) for name in expected - {victim})

    # The stop: the script returns within the bound, every program stopped on its own stop
    # signal (none needed supervisord's SIGKILL: the worker did not hang in its pool
    # finalizer), the Ray head and its session are gone, and so is everything else.
    session = stack.process.pid
    assert processes_of(stack, session)
    stopping = time.monotonic()
    if to_group:
        os.killpg(stack.process.pid, stop_signal)
    else:
        stack.process.send_signal(stop_signal)
    try:
        status = stack.process.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"run.sh still running {STOP_BOUND_S:.0f} s after {stop_signal.name}:\n"
            f"{stack.tail()}\nleft: {processes_of(stack, session)}"
        )
    took = time.monotonic() - stopping
    print(
        f"{stop_signal.name} {'to the group' if to_group else 'to run.sh'}: stopped in {took:.1f} s"
    )
    output = stack.output.read_text(errors="replace")
    assert status == 0, output[-3000:]
    assert "Workbench stopped." in output
    log = stack.supervisor_log
    for name in expected:
        assert re.search(
            rf"stopped: {name} \((exit status 0|terminated by SIG(TERM|INT))\)", log
        ), f"{name} was not stopped by its stop signal:\n{log[-3000:]}"
        assert f"killing '{name}'" not in log, log[-3000:]  # no SIGKILL after stopwaitsecs
    assert "left behind" not in output, output[-3000:]  # the last-resort sweep had no work
    assert not alive(head)
    assert processes_of(stack, session) == {}
    assert processes_of(stack, head) == {}  # the head's session: GCS, raylet, workers
    for name, port in stack.ports.items():  # a next stack can have them
        assert not port_in_use(port), f"{name}={port} still bound after the stop"
