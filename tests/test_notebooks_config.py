"""How the hub is configured: from settings, on loopback, secrets never in the repo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from apps.notebooks import hubconfig
from tests.test_compose import compose_config, environment
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


def test_the_hub_config_holds_no_secret() -> None:
    text = hubconfig.CONFIG_FILE.read_text()
    for name in ("WORKBENCH_SERVICE_TOKEN", "WORKBENCH_OAUTH_CLIENT_SECRET", "JPY_COOKIE_SECRET"):
        assert f'secret("{name}")' in text  # read from the environment (or a _FILE)
    assert "api_tokens" not in text


def test_compose_runs_the_hub_with_dockerspawner_on_loopback_with_docker_secrets() -> None:
    import yaml

    result = compose_config()
    if result.returncode != 0:
        pytest.skip(result.stderr)
    config = yaml.safe_load(result.stdout)
    hub = environment(config, "jupyterhub")
    assert hub["WORKBENCH_HUB_SPAWNER"] == "docker"
    assert hub["WORKBENCH_SERVICE_TOKEN_FILE"].startswith("/run/secrets/")
    assert hub["JPY_COOKIE_SECRET_FILE"].startswith("/run/secrets/")
    ports = config["services"]["jupyterhub"]["ports"]
    assert all(str(p.get("host_ip", "")) == "127.0.0.1" for p in ports if isinstance(p, dict))
    web = environment(config, "web")
    assert web["JUPYTERHUB_API_TOKEN_FILE"] == hub["WORKBENCH_SERVICE_TOKEN_FILE"]
    assert "jupyterhub --register-only" in " ".join(config["services"]["migrate"]["command"])


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
