"""How the hub is configured: from settings, on loopback, secrets never in the repo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from apps.notebooks import hubconfig
from tests.test_compose import environment, load_config
from tests.test_settings import DEPLOY_CHECK, assert_refused, manage, production

ROOT = Path(__file__).resolve().parents[1]


def test_the_hub_environment_comes_from_settings_and_binds_loopback(
    settings: Any, tmp_path: Path
) -> None:
    settings.JUPYTERHUB_API_TOKEN = "service-token"
    settings.JUPYTERHUB_COOKIE_SECRET = "ab" * 32
    settings.JUPYTERHUB_OAUTH_CLIENT_SECRET = "oauth-secret"
    settings.JUPYTERHUB_PUBLIC_URL = "https://notebooks.example.com"
    env = hubconfig.hub_environment(
        data_dir=tmp_path,
        bind_url="http://127.0.0.1:8001",
        hub_bind_url="http://127.0.0.1:8081",
        proxy_api_url="http://127.0.0.1:8002",
    )
    assert env["WORKBENCH_SERVICE_TOKEN"] == "service-token"
    assert env["JPY_COOKIE_SECRET"] == "ab" * 32
    assert env["WORKBENCH_OAUTH_CLIENT_SECRET"] == "oauth-secret"
    assert (
        env["JUPYTERHUB_OAUTH_CALLBACK_URL"] == "https://notebooks.example.com/hub/oauth_callback"
    )
    assert all("127.0.0.1" in env[k] for k in ("JUPYTERHUB_BIND_URL", "JUPYTERHUB_HUB_BIND_URL"))
    assert Path(env["CONFIGPROXY_COMMAND"]).name == "configurable-http-proxy"


HUB_BINDS = """
import json, sys
from traitlets.config import Config
c = Config()
exec(open(sys.argv[1]).read(), {"get_config": lambda: c, "__name__": "jupyterhub_config"})
print(json.dumps({"bind_url": c.JupyterHub.bind_url, "hub_bind_url": c.JupyterHub.hub_bind_url,
                  "proxy_api_url": c.ConfigurableHTTPProxy.api_url, "server_ip": c.Spawner.ip}))
"""


@pytest.mark.parametrize(
    "public_url", ["http://127.0.0.1:18501", "http://0.0.0.0:18501", "http://notebooks.lan:18501"]
)
def test_the_embedded_hub_and_its_servers_listen_on_loopback_whatever_the_public_url(
    settings: Any, tmp_path: Path, public_url: str
) -> None:
    """What ``manage.py jupyterhub`` (make run) hands the hub, read by the hub's real config
    file: the hub, its API, its proxy's API and every server it starts bind 127.0.0.1."""
    import json
    import subprocess
    import sys

    settings.JUPYTERHUB_URL = public_url
    settings.JUPYTERHUB_API_TOKEN = "service-token"
    env = hubconfig.embedded_hub_environment(
        data_dir=tmp_path / "data", hub_port=18502, proxy_api_port=18503
    )
    result = subprocess.run(
        [sys.executable, "-c", HUB_BINDS, str(hubconfig.CONFIG_FILE)],
        # As manage.py jupyterhub runs it: its own environment, then what it builds.
        env={"PATH": "/usr/bin:/bin", "JUPYTERHUB_SINGLEUSER_IP": "0.0.0.0", **env},  # noqa: S104
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "bind_url": "http://127.0.0.1:18501",
        "hub_bind_url": "http://127.0.0.1:18502",
        "proxy_api_url": "http://127.0.0.1:18503",
        "server_ip": "127.0.0.1",
    }


def test_the_hub_config_holds_no_secret() -> None:
    text = hubconfig.CONFIG_FILE.read_text()
    for name in ("WORKBENCH_SERVICE_TOKEN", "WORKBENCH_OAUTH_CLIENT_SECRET", "JPY_COOKIE_SECRET"):
        assert f'secret("{name}")' in text  # read from the environment (or a _FILE)
    assert "api_tokens" not in text


def test_compose_runs_the_hub_with_dockerspawner_on_loopback_with_docker_secrets() -> None:
    # A compose.yaml the CLI refuses fails here (load_config asserts), never skips.
    config = load_config()
    hub = environment(config, "jupyterhub")
    assert hub["WORKBENCH_HUB_SPAWNER"] == "docker"
    assert hub["WORKBENCH_SERVICE_TOKEN_FILE"].startswith("/run/secrets/")
    assert hub["JPY_COOKIE_SECRET_FILE"].startswith("/run/secrets/")
    ports = config["services"]["jupyterhub"]["ports"]
    assert all(str(p.get("host_ip", "")) == "127.0.0.1" for p in ports if isinstance(p, dict))
    web = environment(config, "web")
    assert web["JUPYTERHUB_API_TOKEN_FILE"] == hub["WORKBENCH_SERVICE_TOKEN_FILE"]
    assert "jupyterhub --register-only" in " ".join(config["services"]["migrate"]["command"])
    # DockerSpawner puts notebook containers on the network compose makes for them.
    assert hub["DOCKER_NETWORK_NAME"] == config["networks"]["notebooks"]["name"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # A service key compose does not know.
        (("    restart: unless-stopped\n", "    restart: unless-stopped\n    bogus: 1\n"),
         "(?s)docker-compose config refuses .*bogus"),
        # A port that is none.
        (('"127.0.0.1:9001:9001"', '"127.0.0.1:9001:console"'),
         "(?s)docker-compose config refuses .*minio.ports"),
        # Not YAML at all.
        (("services:\n", "services:\n  - [\n"), "docker-compose config refuses"),
        # The notebooks network's block lost in an edit: `config` lets it pass, `up` would
        # not, and neither does the check.
        (("  notebooks:\n    name:", "  other:\n    name:"),
         "joins undeclared network.*notebooks"),
    ],
)  # fmt: skip
def test_a_compose_file_that_would_not_start_fails_the_check(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    source = (ROOT / "compose.yaml").read_text()
    old, new = change
    assert old in source
    broken = tmp_path / "compose.yaml"
    broken.write_text(source.replace(old, new, 1))
    with pytest.raises(AssertionError, match=expected):
        load_config(broken)


def test_a_notebook_is_handed_mlflow_only_where_it_can_reach_it(settings: Any) -> None:
    from apps.notebooks.models import NotebookServer
    from apps.notebooks.services import _server_env
    from apps.tenants.models import Tenant

    server = NotebookServer(tenant=Tenant(slug="acme"))
    settings.NOTEBOOK_MLFLOW_TRACKING_URI = "http://mlflow.example:5000"
    assert _server_env(server, "token", [])["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    settings.NOTEBOOK_MLFLOW_TRACKING_URI = ""  # compose.yaml: not on MLflow's network
    assert "MLFLOW_TRACKING_URI" not in _server_env(server, "token", [])


def test_production_with_notebooks_configured_passes_the_deploy_check(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("c" * 64)
    result = manage(
        tmp_path,
        DEPLOY_CHECK,
        **production(
            JUPYTERHUB_API_TOKEN_FILE=str(token),
            JUPYTERHUB_COOKIE_SECRET="ab" * 32,
            JUPYTERHUB_OAUTH_CLIENT_SECRET="s" * 40,
        ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues (0 silenced)" in result.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("JUPYTERHUB_COOKIE_SECRET", "not-hex"),
        ("JUPYTERHUB_COOKIE_SECRET", "ab" * 8),
        ("NOTEBOOK_MAX_SERVERS_PER_USER", "0"),
        ("OAUTH_REDIRECT_SCHEMES", "ftp"),
    ],
)
def test_bad_notebook_settings_stop_the_process(tmp_path: Path, name: str, value: str) -> None:
    assert_refused(manage(tmp_path, ["check"], **production(**{name: value})), name)


def test_the_notebook_client_imports_neither_django_nor_celery() -> None:
    import subprocess
    import sys

    code = (
        "import sys, workbench.client\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('django', 'celery', 'apps')]\n"
        "assert not loaded, loaded\n"
        "try:\n"
        "    workbench.client.Workbench()\n"
        "except workbench.client.WorkbenchError as exc:\n"
        "    print(exc.code, exc.message)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
        env={"PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "not_configured WORKBENCH_URL, WORKBENCH_TOKEN, WORKBENCH_TENANT"
    )


def test_the_sync_task_is_registered_and_scheduled(settings: Any) -> None:
    from workbench.celery import app

    app.loader.import_default_modules()
    assert "notebooks.sync" in app.tasks
    assert settings.CELERY_BEAT_SCHEDULE["sync-notebooks"]["task"] == "notebooks.sync"
