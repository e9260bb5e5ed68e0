"""compose.yaml describes the stack DESIGN.md names, wired to its own services.

Checked through ``docker-compose config``, the CLI's own parser: it validates the file and
resolves anchors, merges and variable defaults exactly as ``docker-compose up`` would. No
Docker engine is needed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER_COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"

DESIGN_SERVICES = {
    "postgres",
    "redis",
    "minio",
    "mlflow",
    "web",
    "worker-cpu",
    "worker-gpu",
    "beat",
    "ray-head",
    "ray-gpu-worker",
    "jupyterhub",
    "fleet-controller",
}
APP_SERVICES = ("web", "worker-cpu", "worker-gpu", "beat", "fleet-controller")

pytestmark = pytest.mark.skipif(
    not Path(DOCKER_COMPOSE).is_file(),
    reason="docker-compose CLI not installed (expected at /usr/bin/docker-compose): "
    "the compose file cannot be validated without it",
)


def compose_config(*extra: str) -> subprocess.CompletedProcess[str]:
    # A clean environment, so variables of the machine running the tests (POSTGRES_PASSWORD,
    # ...) cannot change what the defaults in the file resolve to.
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", "compose.yaml", "config", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        check=False,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = compose_config()
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def environment(config: dict[str, Any], service: str) -> dict[str, str]:
    env = config["services"][service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def command(config: dict[str, Any], service: str) -> list[str]:
    cmd = config["services"][service].get("command")
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def gpu_reservation(config: dict[str, Any], service: str) -> list[dict[str, Any]]:
    deploy = config["services"][service].get("deploy") or {}
    devices = deploy.get("resources", {}).get("reservations", {}).get("devices", [])
    return [
        d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
    ]


def test_compose_file_is_valid_for_the_installed_cli() -> None:
    result = compose_config("-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # no deprecation or unknown-key warnings


def test_every_service_named_in_the_design_exists(config: dict[str, Any]) -> None:
    missing = DESIGN_SERVICES - set(config["services"])
    assert not missing, f"compose.yaml lacks {sorted(missing)}"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_use_the_stack_postgres_redis_and_s3(
    config: dict[str, Any], service: str
) -> None:
    env = environment(config, service)

    database = urlparse(env["DATABASE_URL"])
    assert database.scheme in {"postgres", "postgresql"}
    assert database.hostname == "postgres"

    broker = urlparse(env["CELERY_BROKER_URL"])
    assert broker.scheme == "redis"
    assert broker.hostname == "redis"

    assert env["ARTIFACT_STORE"].startswith("s3://workbench/")
    assert urlparse(env["AWS_ENDPOINT_URL"]).hostname == "minio"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert urlparse(env["MLFLOW_TRACKING_URI"]).hostname == "mlflow"
    assert env["RAY_ADDRESS"] == "ray-head:6379"  # drivers join the cluster's GCS
    assert env["WORKBENCH_MODE"] == "production"
    assert env["ALLOWED_HOSTS"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_secret_key_comes_from_a_docker_secret_not_the_environment(
    config: dict[str, Any], service: str
) -> None:
    env = environment(config, service)
    assert "SECRET_KEY" not in env
    assert env["SECRET_KEY_FILE"] == "/run/secrets/secret_key"
    sources = [
        s["source"] if isinstance(s, dict) else s for s in config["services"][service]["secrets"]
    ]
    assert "secret_key" in sources
    assert "secret_key" in config["secrets"]


def test_app_services_build_from_the_repository_dockerfile(config: dict[str, Any]) -> None:
    for service in APP_SERVICES:
        build = config["services"][service]["build"]
        assert Path(build["context"]) == ROOT
        assert build["dockerfile"] == "docker/Dockerfile"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    torch_at = dockerfile.index("pip install torch==2.13.0")
    assert dockerfile.index("pip install .", torch_at) > torch_at  # torch first, pinned


def test_each_process_runs_its_own_command(config: dict[str, Any]) -> None:
    web = command(config, "web")
    assert web[0] == "gunicorn" and "workbench.wsgi" in web
    assert "--config=workbench/gunicorn_conf.py" in web  # the body-read fix and timeouts
    assert command(config, "worker-cpu")[:4] == ["celery", "-A", "workbench", "worker"]
    assert "-Q" in command(config, "worker-cpu")
    assert command(config, "worker-cpu")[command(config, "worker-cpu").index("-Q") + 1] == "default"
    gpu = command(config, "worker-gpu")
    assert gpu[gpu.index("-Q") + 1] == "gpu"
    assert gpu[gpu.index("--concurrency") + 1] == "1"  # one task per GPU
    assert command(config, "beat")[:4] == ["celery", "-A", "workbench", "beat"]
    mlflow = command(config, "mlflow")
    assert mlflow[:2] == ["mlflow", "server"]
    assert "--workers=1" in mlflow
    assert any(
        part.startswith("--backend-store-uri=postgresql://") and "@postgres:" in part
        for part in mlflow
    )
    assert "--artifacts-destination=s3://workbench/mlflow" in mlflow
    assert environment(config, "mlflow")["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


@pytest.mark.parametrize("service", ["worker-gpu", "ray-gpu-worker"])
def test_gpu_services_reserve_an_nvidia_gpu(config: dict[str, Any], service: str) -> None:
    assert gpu_reservation(config, service), f"{service} reserves no nvidia GPU"


def test_cpu_services_reserve_no_gpu(config: dict[str, Any]) -> None:
    for service in ("web", "worker-cpu", "beat", "fleet-controller"):
        assert not gpu_reservation(config, service)


def test_ray_services_run_the_workbench_image_and_join_the_head(config: dict[str, Any]) -> None:
    services = config["services"]
    # Serve replicas import worker.serving; drivers need the cluster's Ray version.
    assert services["ray-head"]["image"] == services["web"]["image"]
    assert services["ray-gpu-worker"]["image"] == services["web"]["image"]
    assert "--head" in command(config, "ray-head")
    assert "--address=ray-head:6379" in command(config, "ray-gpu-worker")


def test_fleet_controller_runs_the_command_checks_its_heartbeat_and_reaches_ray(
    config: dict[str, Any],
) -> None:
    services = config["services"]
    controller = services["fleet-controller"]
    assert command(config, "fleet-controller") == ["python", "manage.py", "fleet_controller"]
    assert controller["image"] == services["web"]["image"] == services["worker-gpu"]["image"]
    # Its health is its own heartbeat (``fleet_controller --check`` exits 0 while fresh).
    check = controller["healthcheck"]["test"]
    assert check[0] == "CMD"
    assert check[1:] == ["python", "manage.py", "fleet_controller", "--check"]
    assert controller["restart"] == "unless-stopped"
    # Wired to Ray as worker-gpu is: the same GCS address and networks, after the head.
    gpu_env, env = environment(config, "worker-gpu"), environment(config, "fleet-controller")
    assert env["RAY_ADDRESS"] == gpu_env["RAY_ADDRESS"] == "ray-head:6379"
    assert controller.get("networks") == services["worker-gpu"].get("networks")
    assert controller["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # Exactly one controller is started; the lease makes any second one a standby.
    assert "replicas" not in (controller.get("deploy") or {})


def test_bucket_is_created_by_a_one_shot_mc_service(config: dict[str, Any]) -> None:
    init = [
        name
        for name, spec in config["services"].items()
        if str(spec.get("image", "")).startswith("minio/mc")
    ]
    assert init, "no minio/mc service creates the bucket"
    spec = config["services"][init[0]]
    assert "mb --ignore-existing stack/workbench" in " ".join(spec["entrypoint"])
    assert spec.get("restart") == "no"
    for service in (*APP_SERVICES, "mlflow"):
        depends = config["services"][service]["depends_on"]
        assert depends[init[0]]["condition"] == "service_completed_successfully"


def test_healthchecks_and_startup_order(config: dict[str, Any]) -> None:
    services = config["services"]
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    for service in APP_SERVICES:
        depends = services[service]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_data_lives_in_named_volumes(config: dict[str, Any]) -> None:
    services = config["services"]

    def targets(service: str) -> set[str]:
        mounts = services[service].get("volumes", [])
        return {m["target"] if isinstance(m, dict) else m.split(":")[1] for m in mounts}

    assert "/var/lib/postgresql/data" in targets("postgres")
    assert "/data" in targets("redis")
    assert "/data" in targets("minio")
    assert "/var/lib/workbench" in targets("web")
    for volume in ("postgres-data", "redis-data", "minio-data", "web-var"):
        assert volume in config["volumes"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_settings_accept_the_environment_compose_gives(
    config: dict[str, Any], service: str, tmp_path: Path
) -> None:
    # Only the paths inside the container are swapped for local ones; every other value is
    # exactly what the container gets. Nothing connects to postgres, redis or minio here.
    key_file = tmp_path / "secret_key"
    key_file.write_text("k" * 20 + "-" + "s3cr3t-" * 8 + "\n")
    given = environment(config, service)
    secrets = {}  # every other docker secret (notebooks' hub token, OAuth secret), locally
    for name, value in given.items():
        if (
            name.endswith("_FILE")
            and value.startswith("/run/secrets/")
            and name != "SECRET_KEY_FILE"
        ):
            local = tmp_path / value.rsplit("/", 1)[1]
            local.write_text("ab" * 32 + "\n")
            secrets[name] = str(local)
    env = {
        **given,
        **secrets,
        "SECRET_KEY_FILE": str(key_file),
        "WORKBENCH_VAR_DIR": str(tmp_path / "var"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
