"""Settings come from the environment, checked: production refuses unsafe or unreadable values.

Each case starts ``manage.py`` in a fresh process with an environment built from nothing,
because settings are read once, at import, and the test process has its own already.
"""

from __future__ import annotations

import secrets
import string
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CHECK = ["check", "--deploy", "--fail-level", "WARNING"]
HOST = "workbench.example.com"


def random_key(length: int = 60) -> str:
    alphabet = string.ascii_letters + string.digits + "!@#%^&*(-_=+)"
    return "".join(secrets.choice(alphabet) for _ in range(length))


def manage(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py`` with only the given variables (plus PATH), in a private var dir."""
    var_dir = tmp_path / "var"
    base = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "WORKBENCH_VAR_DIR": str(var_dir),
        # Multiprocess metrics files of this test run must not be shared with the child.
        "PROMETHEUS_MULTIPROC_DIR": str(var_dir / "prometheus"),
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def last_line(output: str) -> str:
    # `manage.py shell` may print a line about its automatic imports first.
    return output.strip().splitlines()[-1] if output.strip() else ""


def production(**env: str) -> dict[str, str]:
    return {
        "WORKBENCH_MODE": "production",
        "SECRET_KEY": random_key(),
        "ALLOWED_HOSTS": HOST,
        **env,
    }


def assert_refused(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "ImproperlyConfigured" in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in message, message


def test_production_settings_pass_the_deploy_check_with_no_issues(tmp_path: Path) -> None:
    result = manage(tmp_path, DEPLOY_CHECK, **production())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout, result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_development_defaults_pass_the_plain_check(tmp_path: Path) -> None:
    result = manage(tmp_path, ["check", "--fail-level", "WARNING"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_production_without_secret_key_is_refused(tmp_path: Path) -> None:
    env = production()
    del env["SECRET_KEY"]
    assert_refused(manage(tmp_path, DEPLOY_CHECK, **env), "SECRET_KEY")


@pytest.mark.parametrize(
    "key",
    [random_key(49), "dev-only-insecure-key-do-not-use-in-production"],
    ids=["too-short", "development-default"],
)
def test_production_refuses_a_weak_secret_key(tmp_path: Path, key: str) -> None:
    assert_refused(manage(tmp_path, DEPLOY_CHECK, **production(SECRET_KEY=key)), "SECRET_KEY")


@pytest.mark.parametrize("value", ["true", "1", "yes", "on", "TRUE"])
def test_debug_in_production_is_refused(tmp_path: Path, value: str) -> None:
    assert_refused(manage(tmp_path, DEPLOY_CHECK, **production(DEBUG=value)), "DEBUG")


@pytest.mark.parametrize("mode", ["production", "development"])
def test_debug_that_is_not_a_boolean_is_refused(tmp_path: Path, mode: str) -> None:
    env = production(DEBUG="maybe") if mode == "production" else {"DEBUG": "maybe"}
    result = manage(tmp_path, ["check"], **env)
    assert_refused(result, "DEBUG", "'maybe'")


def test_debug_false_in_production_is_accepted(tmp_path: Path) -> None:
    result = manage(tmp_path, ["check"], **production(DEBUG="false"))
    assert result.returncode == 0, result.stderr


def test_production_without_allowed_hosts_is_refused(tmp_path: Path) -> None:
    env = production()
    del env["ALLOWED_HOSTS"]
    assert_refused(manage(tmp_path, ["check"], **env), "ALLOWED_HOSTS")


def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    assert_refused(manage(tmp_path, ["check"], WORKBENCH_MODE="staging"), "WORKBENCH_MODE")


def test_secret_key_is_read_from_secret_key_file(tmp_path: Path) -> None:
    key = random_key()
    key_file = tmp_path / "secret_key"
    key_file.write_text(key + "\n")  # as `echo` or an editor writes it: the newline is not the key
    env = production(SECRET_KEY_FILE=str(key_file))
    del env["SECRET_KEY"]

    checked = manage(tmp_path, ["check"], **env)
    assert checked.returncode == 0, checked.stderr

    compare = manage(
        tmp_path,
        [
            "shell",
            "-c",
            "import os; from django.conf import settings;"
            " print(settings.SECRET_KEY == open(os.environ['SECRET_KEY_FILE'])"
            ".read().strip())",
        ],
        **env,
    )
    assert last_line(compare.stdout) == "True", compare.stdout + compare.stderr


def test_unreadable_secret_key_file_is_refused(tmp_path: Path) -> None:
    env = production(SECRET_KEY_FILE=str(tmp_path / "missing"))
    del env["SECRET_KEY"]
    assert_refused(manage(tmp_path, ["check"], **env), "SECRET_KEY_FILE")


@pytest.mark.parametrize(
    ("value", "problem"), [("abc", "is not an integer"), ("0", "below the minimum")]
)
def test_bad_upload_limit_is_refused(tmp_path: Path, value: str, problem: str) -> None:
    result = manage(tmp_path, ["check"], DATASET_MAX_UPLOAD_BYTES=value)
    assert_refused(result, "DATASET_MAX_UPLOAD_BYTES", problem)


def test_upload_limit_from_the_environment_is_used(tmp_path: Path) -> None:
    result = manage(
        tmp_path,
        [
            "shell",
            "-c",
            "from django.conf import settings; print(settings.DATASET_MAX_UPLOAD_BYTES)",
        ],
        DATASET_MAX_UPLOAD_BYTES="1_000_000",
    )
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == "1000000"


def test_sagemaker_backend_without_its_settings_is_refused(tmp_path: Path) -> None:
    result = manage(tmp_path, ["check"], SERVING_BACKEND="sagemaker", SAGEMAKER_BUCKET="models")
    assert_refused(result, "SAGEMAKER_ROLE_ARN", "SAGEMAKER_IMAGE_URI")


def test_unknown_serving_backend_is_refused(tmp_path: Path) -> None:
    assert_refused(manage(tmp_path, ["check"], SERVING_BACKEND="triton"), "SERVING_BACKEND")


def test_sagemaker_backend_is_built_from_the_settings(tmp_path: Path) -> None:
    code = (
        "from apps.deployments.backends import get_backend; b = get_backend(); "
        "print(type(b).__name__, b.endpoint_name('classifier'))"
    )
    result = manage(
        tmp_path,
        ["shell", "-c", code],
        SERVING_BACKEND="sagemaker",
        SAGEMAKER_BUCKET="models",
        SAGEMAKER_ROLE_ARN="arn:aws:iam::123456789012:role/sm",
        SAGEMAKER_IMAGE_URI="123456789012.dkr.ecr.us-east-1.amazonaws.com/wb:1",
        SAGEMAKER_ENDPOINT_PREFIX="acme-prod",
    )
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == "SageMakerFleet acme-prod-classifier"


def test_the_embedded_broker_takes_a_task(tmp_path: Path) -> None:
    """No CELERY_BROKER_URL: tasks go to the SQLite-backed broker under the var dir."""
    code = (
        "from workbench.celery import app; "
        "app.send_task('core.cleanup_stale_uploads'); "
        "import sqlite3; from django.conf import settings; "
        "db = settings.CELERY_BROKER_URL.removeprefix('sqla+sqlite:///'); "
        "print(sqlite3.connect(db).execute('select count(*) from kombu_message').fetchone()[0])"
    )
    result = manage(tmp_path, ["shell", "-c", code])
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == "1"


BROKER_CODE = "from workbench.celery import app; print(app.conf.broker_url)"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://redis.example:6379/0", "redis://:p%40ss%2Fw%3Ard@redis.example:6379/0"),
        ("rediss://celery@redis.example:6380/1", "rediss://celery:p%40ss%2Fw%3Ard@redis.example:6380/1"),
    ],
)  # fmt: skip
def test_the_broker_signs_in_to_redis_with_the_password_from_a_file(
    tmp_path: Path, url: str, expected: str
) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text("p@ss/w:rd\n")  # as a secret file holds it: the newline is not part of it
    result = manage(
        tmp_path,
        ["shell", "-c", BROKER_CODE],
        CELERY_BROKER_URL=url,
        REDIS_PASSWORD_FILE=str(secret),
    )
    assert result.returncode == 0, result.stderr
    # What Celery connects with, although the CELERY_BROKER_URL variable it prefers has none.
    assert last_line(result.stdout) == expected


def test_the_throttle_cache_signs_in_to_redis_with_the_same_password(tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text("p@ss/w:rd\n")
    result = manage(
        tmp_path,
        ["shell", "-c", "from django.conf import settings; "
         "print(settings.CACHES['default']['LOCATION'])"],
        CELERY_BROKER_URL="redis://redis:6379/0",
        CACHE_URL="redis://redis:6379/1",
        REDIS_PASSWORD_FILE=str(secret),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == "redis://:p%40ss%2Fw%3Ard@redis:6379/1"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        # The embedded broker has no password to take.
        ({"REDIS_PASSWORD": "secret"}, ("REDIS_PASSWORD", "CELERY_BROKER_URL")),
        # Two sources for one password.
        (
            {"REDIS_PASSWORD": "secret", "CELERY_BROKER_URL": "redis://:other@redis:6379/0"},
            ("REDIS_PASSWORD", "CELERY_BROKER_URL"),
        ),
        ({"REDIS_PASSWORD_FILE": "/nonexistent/redis_password"}, ("REDIS_PASSWORD_FILE",)),
    ],
)
def test_a_redis_password_the_broker_cannot_use_stops_the_process(
    tmp_path: Path, env: dict[str, str], names: tuple[str, ...]
) -> None:
    assert_refused(manage(tmp_path, ["check"], **env), *names)


def test_mlflow_credentials_reach_mlflows_client_with_the_password_from_a_file(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "mlflow_password"
    secret.write_text("s3cret\n")
    code = (
        "from django.conf import settings; "
        "from mlflow.environment_variables import MLFLOW_TRACKING_PASSWORD as P, "
        "MLFLOW_TRACKING_USERNAME as U; print(U.get(), P.get())"
    )
    result = manage(
        tmp_path,
        ["shell", "-c", code],
        MLFLOW_TRACKING_USERNAME="workbench",
        MLFLOW_TRACKING_PASSWORD_FILE=str(secret),
    )
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == "workbench s3cret"


@pytest.mark.parametrize(
    "env", [{"MLFLOW_TRACKING_USERNAME": "workbench"}, {"MLFLOW_TRACKING_PASSWORD": "s3cret"}]
)
def test_half_of_the_mlflow_credentials_stops_the_process(
    tmp_path: Path, env: dict[str, str]
) -> None:
    assert_refused(
        manage(tmp_path, ["check"], **env), "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
    )
