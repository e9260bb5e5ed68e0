"""A real JupyterHub on loopback for the suite (pytest plugin, loaded by conftest.py).

The hub runs once per session with the repository's own configuration, the environment
``hubconfig.hub_environment`` builds, and the proxy ``make install`` put under
node_modules/; it signs users in through the live test server (OAuth) and spawns servers
as local processes. Two extra services are added for the tests only: ``pytest`` (may
reach any server, to execute code in its kernel) and ``culler`` (the idle culler's
scopes, to run the real culler against the hub on demand).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from tests.conftest import free_port

TEST_CONFIG = """
import os
load_subconfig({main!r})
c.JupyterHub.services += [
    {{"name": "pytest", "api_token": os.environ["PYTEST_HUB_TOKEN"]}},
    {{"name": "culler", "api_token": os.environ["PYTEST_CULLER_TOKEN"]}},
]
c.JupyterHub.load_roles += [
    {{"name": "pytest", "scopes": ["access:servers", "admin:users", "servers"],
      "services": ["pytest"]}},
    {{"name": "culler", "services": ["culler"],
      "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]}},
]
"""


@dataclass
class Hub:
    url: str
    service_token: str  # the workbench's
    pytest_token: str
    culler_token: str
    oauth_secret: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/hub/api{path}", data=data, method=method)
        request.add_header("Authorization", f"token {token or self.pytest_token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, _parsed(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _parsed(exc.read())

    def settings(self) -> dict[str, Any]:
        return {
            "JUPYTERHUB_URL": self.url,
            "JUPYTERHUB_PUBLIC_URL": self.url,
            "JUPYTERHUB_API_TOKEN": self.service_token,
            "JUPYTERHUB_OAUTH_CLIENT_SECRET": self.oauth_secret,
        }


def _parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return raw.decode(errors="replace")  # the proxy's plain-text answers


@pytest.fixture(scope="session")
def jupyterhub(live_server: Any, tmp_path_factory: Any) -> Iterator[Hub]:
    from apps.notebooks import hubconfig

    tmp = tmp_path_factory.mktemp("jupyterhub")
    port, hub_port, proxy_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    hub = {
        "service_token": secrets.token_hex(32),
        "pytest_token": secrets.token_hex(32),
        "culler_token": secrets.token_hex(32),
        "oauth_secret": secrets.token_urlsafe(32),
    }
    with override_settings(
        JUPYTERHUB_URL=url,
        JUPYTERHUB_PUBLIC_URL=url,
        JUPYTERHUB_API_TOKEN=hub["service_token"],
        JUPYTERHUB_OAUTH_CLIENT_SECRET=hub["oauth_secret"],
        JUPYTERHUB_COOKIE_SECRET=secrets.token_hex(32),
        WORKBENCH_URL=live_server.url,
    ):
        env = hubconfig.hub_environment(
            data_dir=tmp / "data",
            bind_url=url,
            hub_bind_url=f"http://127.0.0.1:{hub_port}",
            proxy_api_url=f"http://127.0.0.1:{proxy_port}",
        )
    config = tmp / "jupyterhub_config.py"
    config.write_text(TEST_CONFIG.format(main=str(hubconfig.CONFIG_FILE)))
    env.update(
        {
            "PYTEST_HUB_TOKEN": hub["pytest_token"],
            "PYTEST_CULLER_TOKEN": hub["culler_token"],
            # Servers outlive nothing in a test run; the culler the hub runs itself must
            # not cull a server a test is using (the tests run their own culler).
            "NOTEBOOK_IDLE_TIMEOUT_SECONDS": "3600",
        }
    )
    log_path = tmp / "jupyterhub.log"
    jupyterhub_bin = str(Path(sys.executable).with_name("jupyterhub"))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [jupyterhub_bin, "-f", str(config)],
            cwd=str(tmp),
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Hub(url=url, log_path=log_path, process=process, **hub)
    try:
        _wait_ready(running)
        yield running
    finally:
        _stop(process)


def _wait_ready(hub: Hub) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if hub.api("GET", "/")[0] == 200:
                return
        except OSError:
            pass
        if hub.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"JupyterHub did not start:\n{hub.log()}")
        time.sleep(0.3)


def _stop(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        # The hub stops its proxy and the culler service itself (SIGINT, then SIGTERM
        # after 10 s): give it that long, they are not in its process group.
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def hub_settings(jupyterhub: Hub, settings: Any, live_server: Any) -> Hub:
    """Point the workbench (this process and the live server thread) at the test hub."""
    for name, value in jupyterhub.settings().items():
        setattr(settings, name, value)
    settings.WORKBENCH_URL = live_server.url
    return jupyterhub


def execute(hub: Hub, server_path: str, code: str, *, timeout: float = 120) -> str:
    """Run ``code`` in a new kernel of the server at ``server_path`` (``/user/x/y/``), through
    the hub's proxy; its stdout, or a RuntimeError with the traceback."""
    return asyncio.run(_execute(hub, server_path, code, timeout))


async def _execute(hub: Hub, server_path: str, code: str, timeout: float) -> str:
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    from tornado.websocket import websocket_connect

    base = f"{hub.url}{server_path}"
    headers = {"Authorization": f"token {hub.pytest_token}"}
    client = AsyncHTTPClient()
    created = await client.fetch(
        f"{base}api/kernels", method="POST", body="{}", headers=headers, request_timeout=60
    )
    kernel = json.loads(created.body)["id"]
    ws_url = f"ws{base[4:]}api/kernels/{kernel}/channels"
    socket = await websocket_connect(HTTPRequest(ws_url, headers=headers, connect_timeout=60))
    msg_id = uuid.uuid4().hex
    await socket.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "username": "pytest",
                    "session": uuid.uuid4().hex,
                    "msg_type": "execute_request",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    out: list[str] = []
    error = ""
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"kernel did not finish in {timeout}s; output: {''.join(out)}")
            raw = await asyncio.wait_for(socket.read_message(), remaining)
            if raw is None:
                raise RuntimeError("kernel websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                error = "\n".join(msg["content"]["traceback"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        socket.close()
        await client.fetch(
            f"{base}api/kernels/{kernel}", method="DELETE", headers=headers, raise_error=False
        )
    if error:
        raise RuntimeError(f"kernel raised:\n{error}\noutput:\n{''.join(out)}")
    return "".join(out)
