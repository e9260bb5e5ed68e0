"""MLflow behind its basic-auth app, configured as compose.yaml runs it
(``docker/mlflow/basic_auth.ini``, the admin's name and password from the environment):
the workbench signs in with the credentials its settings read from a secret file, and a
caller without them (code in a notebook, say) gets nothing.

One real ``mlflow server --app-name basic-auth`` on loopback for the module; only its user
store and backend paths are local ones.
"""

from __future__ import annotations

import configparser
import json
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import running_mlflow
from tests.test_settings import last_line, manage

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "workbench"  # compose.yaml's MLFLOW_ADMIN_USERNAME default


@dataclass(frozen=True)
class AuthServer:
    url: str
    password: str


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: Any) -> Iterator[AuthServer]:
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    ini = configparser.ConfigParser()
    assert ini.read(ROOT / "docker" / "mlflow" / "basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp / 'basic_auth.db'}"
    config = tmp / "basic_auth.ini"
    with config.open("w") as fh:
        ini.write(fh)
    password = secrets.token_hex(16)
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_TRACKING")
    }
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
        MLFLOW_AUTH_ADMIN_PASSWORD=password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
    )
    with running_mlflow(tmp, "--app-name=basic-auth", env=env) as url:
        yield AuthServer(url=url, password=password)


def status_without_credentials(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_a_caller_without_credentials_reads_no_runs_and_no_artifacts(
    auth_server: AuthServer,
) -> None:
    for path in (
        "/api/2.0/mlflow/experiments/search?max_results=10",
        "/api/2.0/mlflow/registered-models/search",
        "/api/2.0/mlflow-artifacts/artifacts",
    ):
        assert status_without_credentials(auth_server.url + path) == 401, path


TRACK = """
import json
from apps.training.tracking import Tracking
tracking = Tracking()
run_id = tracking.start(existing_run_id="", tenant_slug="acme", run_name="intents-1",
                        params={"lr": 0.001}, tags={"tenant": "acme"})
tracking.client.log_text(run_id, "hello", "notes/readme.txt")
print(json.dumps({"run": run_id,
                  "artifacts": [f.path for f in tracking.client.list_artifacts(run_id, "notes")]}))
"""


def track_as_the_workbench(server: AuthServer, tmp_path: Path, password: str) -> Any:
    """TRACK in a fresh process, with the settings compose gives the workbench."""
    secret = tmp_path / "mlflow_admin_password"
    secret.write_text(password + "\n")
    return manage(
        tmp_path,
        ["shell", "-c", TRACK],
        MLFLOW_TRACKING_URI=server.url,
        MLFLOW_TRACKING_USERNAME=ADMIN,
        MLFLOW_TRACKING_PASSWORD_FILE=str(secret),
        MLFLOW_DISABLE_TELEMETRY="true",
    )


def test_the_workbench_signs_in_with_the_password_from_its_secret_file(
    auth_server: AuthServer, tmp_path: Path
) -> None:
    result = track_as_the_workbench(auth_server, tmp_path, auth_server.password)
    assert result.returncode == 0, result.stderr[-3000:]
    tracked = json.loads(last_line(result.stdout))
    assert tracked["artifacts"] == ["notes/readme.txt"]
    # ... and the run it made is there, for it and nobody else.
    path = f"/api/2.0/mlflow/runs/get?run_id={tracked['run']}"
    assert status_without_credentials(auth_server.url + path) == 401


def test_a_wrong_password_is_refused(auth_server: AuthServer, tmp_path: Path) -> None:
    result = track_as_the_workbench(auth_server, tmp_path, "not-" + auth_server.password)
    assert result.returncode != 0
    assert "401" in result.stderr or "Unauthorized" in result.stderr, result.stderr[-3000:]
