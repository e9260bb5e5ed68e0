"""The environment JupyterHub starts with, built from the workbench's settings.

``docker/jupyterhub/jupyterhub_config.py`` reads only environment variables, so the
embedded stack (``manage.py jupyterhub``), the test suite and compose configure one file
the same way; here the values come from ``workbench/settings.py``, never from the repo.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings

CONFIG_FILE = Path(settings.BASE_DIR) / "docker" / "jupyterhub" / "jupyterhub_config.py"
PROXY = Path(settings.BASE_DIR) / "node_modules" / ".bin" / "configurable-http-proxy"
LOOPBACK = "127.0.0.1"


def proxy_command() -> str:
    """configurable-http-proxy as ``make install`` put it (npm), or one on PATH."""
    if PROXY.exists():
        return str(PROXY)
    found = shutil.which("configurable-http-proxy")
    if found is None:
        raise FileNotFoundError(
            f"configurable-http-proxy is not installed: run `make install` (npm ci puts it "
            f"at {PROXY})"
        )
    return found


def hub_environment(
    *,
    data_dir: Path,
    bind_url: str,
    hub_bind_url: str,
    proxy_api_url: str,
) -> dict[str, str]:
    env = {
        "JUPYTERHUB_DATA_DIR": str(data_dir),
        "JUPYTERHUB_BIND_URL": bind_url,
        "JUPYTERHUB_HUB_BIND_URL": hub_bind_url,
        "JUPYTERHUB_PROXY_API_URL": proxy_api_url,
        "CONFIGPROXY_COMMAND": proxy_command(),
        "WORKBENCH_HUB_SPAWNER": "local",
        # Each server a local process on loopback, whatever this process's environment says.
        "JUPYTERHUB_SINGLEUSER_IP": LOOPBACK,
        "WORKBENCH_SERVICE_TOKEN": settings.JUPYTERHUB_API_TOKEN,
        "WORKBENCH_URL": settings.WORKBENCH_URL,
        "WORKBENCH_OAUTH_CLIENT_ID": settings.JUPYTERHUB_OAUTH_CLIENT_ID,
        "WORKBENCH_OAUTH_CLIENT_SECRET": settings.JUPYTERHUB_OAUTH_CLIENT_SECRET,
        "JUPYTERHUB_OAUTH_CALLBACK_URL": oauth_callback_url(),
        "NOTEBOOK_IDLE_TIMEOUT_SECONDS": str(settings.NOTEBOOK_IDLE_TIMEOUT_SECONDS),
        "NOTEBOOK_MAX_AGE_SECONDS": str(settings.NOTEBOOK_MAX_AGE_SECONDS),
        "NOTEBOOK_MAX_SERVERS_PER_USER": str(settings.NOTEBOOK_MAX_SERVERS_PER_USER),
    }
    if settings.JUPYTERHUB_COOKIE_SECRET:
        env["JPY_COOKIE_SECRET"] = settings.JUPYTERHUB_COOKIE_SECRET
    return env


def embedded_hub_environment(
    *, data_dir: Path, hub_port: int, proxy_api_port: int
) -> dict[str, str]:
    """The hub of the embedded stack (``manage.py jupyterhub``): it, its API and its proxy's
    API listen on loopback only, the public side on the port of JUPYTERHUB_URL. The hub
    has the workbench's service token and starts processes as this user: nothing beyond
    this machine may talk to it, whatever host JUPYTERHUB_URL names."""
    public = urlsplit(settings.JUPYTERHUB_URL)
    port = public.port or (443 if public.scheme == "https" else 80)
    return hub_environment(
        data_dir=data_dir,
        bind_url=f"{public.scheme}://{LOOPBACK}:{port}{public.path}",
        hub_bind_url=f"http://{LOOPBACK}:{hub_port}",
        proxy_api_url=f"http://{LOOPBACK}:{proxy_api_port}",
    )


def oauth_callback_url() -> str:
    return f"{settings.JUPYTERHUB_PUBLIC_URL}/hub/oauth_callback"
