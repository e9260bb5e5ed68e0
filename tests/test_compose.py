"""compose.yaml describes the stack DESIGN.md names, wired to its own services.

Checked through ``docker-compose config``, the CLI's own parser: it validates the file and
resolves anchors, merges and variable defaults exactly as ``docker-compose up`` would. No
Docker engine is needed.
"""

from __future__ import annotations

import re
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

# The services a notebook container may reach: the workbench's API and the hub.
NOTEBOOK_REACHES = {"web", "jupyterhub"}


def compose_config(
    *extra: str, file: Path = ROOT / "compose.yaml"
) -> subprocess.CompletedProcess[str]:
    # Not a skip: without the CLI the file is not validated, and that must show as red
    # (README: docker-compose is needed to run the tests; .ci/run installs it).
    assert Path(DOCKER_COMPOSE).is_file(), (
        f"docker-compose CLI not installed (expected at {DOCKER_COMPOSE}): compose.yaml "
        "cannot be validated without it (apt-get install docker-compose)"
    )
    # A clean environment, so variables of the machine running the tests (POSTGRES_PASSWORD,
    # ...) cannot change what the defaults in the file resolve to. Relative paths in the
    # file resolve against the repository, wherever the file is.
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(file), "--project-directory", str(ROOT), "config", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        check=False,
    )


def load_config(file: Path = ROOT / "compose.yaml") -> dict[str, Any]:
    """The file as ``docker-compose config`` resolves it; AssertionError (a red test, never
    a skip) when the CLI refuses it, or when a service joins a network the file does not
    declare (``config`` lets that pass; ``up`` fails on it)."""
    result = compose_config(file=file)
    assert result.returncode == 0, f"docker-compose config refuses {file}:\n{result.stderr}"
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict), result.stdout
    declared = set(parsed.get("networks") or {}) | {"default"}
    for name, spec in parsed["services"].items():
        undeclared = set(spec.get("networks") or []) - declared
        assert not undeclared, f"{file}: {name} joins undeclared network(s) {sorted(undeclared)}"
    return parsed


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_config()


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


SECRET_VALUE = "ab" * 32  # what each docker secret but SECRET_KEY holds, locally


def container_env(config: dict[str, Any], service: str, tmp_path: Path) -> dict[str, str]:
    """The environment compose gives ``service``, with only the paths inside the container
    swapped for local ones (each docker secret a local file holding SECRET_VALUE)."""
    key_file = tmp_path / "secret_key"
    key_file.write_text("k" * 20 + "-" + "s3cr3t-" * 8 + "\n")
    given = environment(config, service)
    secrets = {}  # every other docker secret (hub token, OAuth, Redis, MLflow), locally
    for name, value in given.items():
        if (
            name.endswith("_FILE")
            and value.startswith("/run/secrets/")
            and name != "SECRET_KEY_FILE"
        ):
            local = tmp_path / value.rsplit("/", 1)[1]
            local.write_text(SECRET_VALUE + "\n")
            secrets[name] = str(local)
    return {
        **given,
        **secrets,
        "SECRET_KEY_FILE": str(key_file),
        "WORKBENCH_VAR_DIR": str(tmp_path / "var"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
    }


def run_manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("service", APP_SERVICES)
def test_settings_accept_the_environment_compose_gives(
    config: dict[str, Any], service: str, tmp_path: Path
) -> None:
    # Every value but the paths is exactly what the container gets. Nothing connects to
    # postgres, redis or minio here.
    result = run_manage(container_env(config, service, tmp_path), "check", "--deploy")
    assert result.returncode == 0, result.stdout + result.stderr


# --- who reaches whom ---------------------------------------------------------------------


def networks_of(config: dict[str, Any], service: str) -> set[str]:
    """The compose networks ``service`` joins (``default`` when it names none)."""
    return set(config["services"][service].get("networks") or ["default"])


def members(config: dict[str, Any], network: str) -> set[str]:
    return {
        name
        for name, spec in config["services"].items()
        if "build" not in (spec.get("profiles") or []) and network in networks_of(config, name)
    }


def notebook_network(config: dict[str, Any]) -> str:
    """The compose network DockerSpawner attaches notebook containers to, found by the
    name the hub is given (DOCKER_NETWORK_NAME)."""
    name = environment(config, "jupyterhub")["DOCKER_NETWORK_NAME"]
    found = [
        key
        for key, spec in (config.get("networks") or {}).items()
        if (spec or {}).get("name") == name
    ]
    assert found, f"DOCKER_NETWORK_NAME={name} is no network compose.yaml creates"
    assert not (config["networks"][found[0]] or {}).get("external")
    return found[0]


def hosts_called(config: dict[str, Any], service: str) -> set[str]:
    """The other services ``service`` is configured to call: each one named as a host
    (``name:port``) in its environment, command or entrypoint."""
    spec = config["services"][service]
    text = " ".join(
        [*environment(config, service).values()]
        + [str(part) for key in ("command", "entrypoint") for part in (spec.get(key) or [])]
    )
    named = set(re.findall(r"(?:^|[\s/@=,])([a-z][a-z0-9-]*):\d+", text))
    return (named & set(config["services"])) - {service}


def mounts(config: dict[str, Any], service: str) -> dict[str, str]:
    """target → source (a host path or a volume's name) of each of ``service``'s mounts."""
    found = {}
    for mount in config["services"][service].get("volumes") or []:
        if isinstance(mount, dict):
            found[mount["target"]] = str(mount.get("source", ""))
        else:
            source, target = str(mount).split(":")[:2]
            found[target] = source
    return found


def secret_sources(config: dict[str, Any], service: str) -> list[str]:
    secrets = config["services"][service].get("secrets") or []
    return [s["source"] if isinstance(s, dict) else s for s in secrets]


def published_ports(config: dict[str, Any], service: str) -> list[tuple[str, int]]:
    """(host address, container port) of each port ``service`` publishes."""
    found = []
    for port in config["services"][service].get("ports") or []:
        if isinstance(port, dict):
            found.append((str(port.get("host_ip", "0.0.0.0")), int(port["target"])))  # noqa: S104
        else:
            parts = str(port).split("/")[0].split(":")
            host = parts[0] if len(parts) == 3 else "0.0.0.0"  # noqa: S104
            found.append((host, int(parts[-1])))
    return found


def test_notebook_containers_share_a_network_only_with_web_and_the_hub(
    config: dict[str, Any],
) -> None:
    network = notebook_network(config)
    assert members(config, network) == NOTEBOOK_REACHES
    for service in ("mlflow", "redis", "postgres", "minio", "ray-head", "ray-gpu-worker"):
        assert not networks_of(config, service) & networks_of(config, "jupyterhub"), service
        assert network not in networks_of(config, service), service
    # No service left on compose's implicit network, where anything started would land.
    assert not members(config, "default")
    # The hub's other networks hold only the workbench's processes that call its API: the
    # notebooks' neighbour reaches no data or compute either.
    for other in networks_of(config, "jupyterhub") - {network}:
        assert members(config, other) <= {"jupyterhub", *APP_SERVICES}, other


def calls_of(config: dict[str, Any]) -> dict[str, set[str]]:
    """service → the services it calls. Every service of the workbench image is given the
    hub's URL with the shared environment, but only web and the workers of the default
    queue (where the notebook tasks go: CELERY_TASK_ROUTES sends only training and
    evaluation elsewhere) call it."""
    calls = {name: hosts_called(config, name) for name in config["services"]}
    for service in calls:
        if "JUPYTERHUB_URL" not in environment(config, service):
            continue
        cmd = command(config, service)
        queues = cmd[cmd.index("-Q") + 1].split(",") if "-Q" in cmd else []
        if service != "web" and "default" not in queues:
            calls[service].discard("jupyterhub")
    return calls


def test_every_service_shares_a_network_with_each_service_it_calls(
    config: dict[str, Any],
) -> None:
    calls = calls_of(config)
    # The wiring the stack works by (the check below is only as good as this list).
    for service in ("web", "worker-cpu", "worker-gpu", "beat"):
        assert {"postgres", "redis", "minio", "mlflow", "ray-head"} <= calls[service], service
    assert "jupyterhub" in calls["web"] and "jupyterhub" in calls["worker-cpu"]
    assert "ray-head" in calls["fleet-controller"]
    assert {"postgres", "minio"} <= calls["mlflow"]
    assert "ray-head" in calls["ray-gpu-worker"]
    for service, called in calls.items():
        for other in called:
            assert networks_of(config, service) & networks_of(config, other), (
                f"{service} calls {other} but shares no network with it"
            )


def test_redis_asks_for_the_password_of_a_secret_that_the_workbench_signs_in_with(
    config: dict[str, Any],
) -> None:
    redis = config["services"]["redis"]
    started = " ".join(command(config, "redis"))
    assert '--requirepass "$$(cat /run/secrets/redis_password)"' in started
    assert "redis_password" in secret_sources(config, "redis")
    assert "redis_password" in config["secrets"]
    assert "/run/secrets/redis_password" in " ".join(redis["healthcheck"]["test"])  # signs in
    for service in APP_SERVICES:
        env = environment(config, service)
        assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert "redis_password" in [
            s["source"] if isinstance(s, dict) else s
            for s in config["services"][service]["secrets"]
        ]
        assert urlparse(env["CELERY_BROKER_URL"]).password is None  # never in the environment


def test_mlflow_runs_its_basic_auth_app_and_the_workbench_signs_in_as_its_admin(
    config: dict[str, Any],
) -> None:
    import configparser

    mlflow = config["services"]["mlflow"]
    assert command(config, "mlflow")[:3] == ["mlflow", "server", "--app-name=basic-auth"]
    env = environment(config, "mlflow")
    entrypoint = " ".join(mlflow["entrypoint"])
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$$(cat /run/secrets/mlflow_admin_password)"' in entrypoint
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=" in entrypoint and 'exec "$$@"' in entrypoint
    assert "mlflow_admin_password" in secret_sources(config, "mlflow")
    # The app ships in mlflow's [auth] extra (Flask-WTF): without it the server cannot start.
    build = mlflow["build"]
    dockerfile = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile.read_text()
    mounted = mounts(config, "mlflow")
    ini = configparser.ConfigParser()
    assert ini.read(mounted[env["MLFLOW_AUTH_CONFIG_PATH"]])
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    # The user store lives on a volume of its own, so it (and the admin) outlive the container.
    store = Path(ini["mlflow"]["database_uri"].removeprefix("sqlite:///"))
    assert mounted[str(store.parent)] == "mlflow-auth"
    assert "mlflow-auth" in config["volumes"]
    for service in APP_SERVICES:
        assert "mlflow_admin_password" in secret_sources(config, service)
        workbench = environment(config, service)
        assert workbench["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"]
        assert workbench["MLFLOW_TRACKING_PASSWORD_FILE"] == "/run/secrets/mlflow_admin_password"
        assert "MLFLOW_TRACKING_PASSWORD" not in workbench
        # Notebooks are not handed an address they cannot reach.
        assert workbench["NOTEBOOK_MLFLOW_TRACKING_URI"] == ""


def test_no_ray_dashboard_or_job_api_is_started_or_published(config: dict[str, Any]) -> None:
    head = command(config, "ray-head")
    assert "--include-dashboard=false" in head
    assert not [part for part in head if part.startswith("--dashboard-host")]
    for service in ("ray-head", "ray-gpu-worker"):
        assert not published_ports(config, service), service
    # Nothing publishes Ray's dashboard, agent or client ports under another name either.
    for service in config["services"]:
        assert not {8265, 52365, 10001} & {p for _, p in published_ports(config, service)}


def test_only_web_is_published_beyond_loopback(config: dict[str, Any]) -> None:
    for service in config["services"]:
        for host, port in published_ports(config, service):
            if service != "web":
                assert host == "127.0.0.1", f"{service} publishes {port} on {host}"


@pytest.mark.parametrize("service", ["web", "worker-cpu", "fleet-controller"])
def test_the_workbench_signs_in_to_redis_and_mlflow_with_the_secrets(
    config: dict[str, Any], service: str, tmp_path: Path
) -> None:
    code = (
        "import os; from workbench.celery import app; "
        "print(app.conf.broker_url); "
        "print(os.environ['MLFLOW_TRACKING_USERNAME'], os.environ['MLFLOW_TRACKING_PASSWORD']); "
        "from django.conf import settings; print(settings.CACHES['default']['LOCATION'])"
    )
    result = run_manage(container_env(config, service, tmp_path), "shell", "-c", code)
    assert result.returncode == 0, result.stderr
    broker, credentials, cache = result.stdout.strip().splitlines()[-3:]
    assert broker == f"redis://:{SECRET_VALUE}@redis:6379/0"
    assert credentials == f"workbench {SECRET_VALUE}"
    # The API's throttle counts live in Redis, shared by every web process.
    assert cache == f"redis://:{SECRET_VALUE}@redis:6379/1"
