"""JupyterHub for the workbench: the workbench signs users in (OAuth 2) and starts their
servers through the REST API with its service token; nothing else starts a server.

Every value comes from the environment, so one file serves the embedded stack
(``manage.py jupyterhub`` builds the environment from the workbench's settings and starts
the hub on loopback with a local-process spawner), ``compose.yaml`` (DockerSpawner) and
Kubernetes (KubeSpawner, see the README). No secret is written here: the service token,
the OAuth client secret and the cookie secret arrive in the environment.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from oauthenticator.generic import GenericOAuthenticator
from tornado import web

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - injected by JupyterHub


def _stop_while_starting(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT before the hub is up. JupyterHub installs its own handlers only at the
    end of its start, after it started its proxy in a session of its own, so a stop signal
    in between ended the hub and left the proxy running (seen under ``make run``: Ctrl-C
    seconds after the start). Stop the proxy if it started, then exit as the signal would
    have. Once the hub is up its own handlers replace this one (a graceful shutdown)."""
    from jupyterhub.app import JupyterHub

    if JupyterHub.initialized():
        proxy = getattr(JupyterHub.instance(), "proxy", None)
        process = getattr(proxy, "proxy_process", None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
    signal.signal(signum, signal.SIG_DFL)  # ended by the signal, as without this handler
    os.kill(os.getpid(), signum)


for _signal in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signal, _stop_while_starting)

env = os.environ.get


def secret(name: str, default: str = "") -> str:
    """A secret from NAME, or from the file NAME_FILE names (Docker/Kubernetes secrets)."""
    path = env(f"{name}_FILE")
    return Path(path).read_text().strip() if path else env(name, default) or default


data_dir = Path(env("JUPYTERHUB_DATA_DIR", "/srv/jupyterhub/data"))
data_dir.mkdir(parents=True, exist_ok=True)
workbench_url = env("WORKBENCH_URL", "http://127.0.0.1:8000").rstrip("/")

# --- network: loopback unless told otherwise ---------------------------------------------
c.JupyterHub.bind_url = env("JUPYTERHUB_BIND_URL", "http://127.0.0.1:8001")
c.JupyterHub.hub_bind_url = env("JUPYTERHUB_HUB_BIND_URL", "http://127.0.0.1:8081")
if env("JUPYTERHUB_HUB_CONNECT_URL"):
    c.JupyterHub.hub_connect_url = env("JUPYTERHUB_HUB_CONNECT_URL")
c.ConfigurableHTTPProxy.api_url = env("JUPYTERHUB_PROXY_API_URL", "http://127.0.0.1:8002")
proxy = env("CONFIGPROXY_COMMAND") or shutil.which("configurable-http-proxy")
if proxy:
    c.ConfigurableHTTPProxy.command = [proxy]
c.JupyterHub.db_url = env("JUPYTERHUB_DB_URL", f"sqlite:///{data_dir / 'jupyterhub.sqlite'}")
c.JupyterHub.pid_file = str(data_dir / "jupyterhub.pid")
# The proxy's too (its default is the working directory): a hub that starts finds the proxy
# an earlier, killed hub left and stops it, so it must never find another stack's.
c.ConfigurableHTTPProxy.pid_file = str(data_dir / "jupyterhub-proxy.pid")
# The cookie secret (hex) from the environment; without one the hub keeps its own here.
if secret("JPY_COOKIE_SECRET"):
    c.JupyterHub.cookie_secret = bytes.fromhex(secret("JPY_COOKIE_SECRET"))
c.JupyterHub.cookie_secret_file = str(data_dir / "jupyterhub_cookie_secret")

# --- sign-in: the workbench is the OAuth 2 provider --------------------------------------


class WorkbenchAuthenticator(GenericOAuthenticator):
    """Only members of at least one tenant get in: the workbench's userinfo lists them."""

    async def check_allowed(self, username, auth_model):  # type: ignore[no-untyped-def]
        if await super().check_allowed(username, auth_model):
            return True
        user_info = (auth_model or {}).get("auth_state", {}).get(self.user_auth_state_key) or {}
        if user_info.get("tenants"):
            return True
        raise web.HTTPError(
            403,
            f"{username} is not a member of any tenant in the workbench, so has no notebooks. "
            "Ask a tenant admin to add you.",
        )


c.JupyterHub.authenticator_class = WorkbenchAuthenticator
c.Authenticator.auto_login = True
c.Authenticator.allow_existing_users = False
c.GenericOAuthenticator.login_service = "Workbench"
c.GenericOAuthenticator.client_id = env("WORKBENCH_OAUTH_CLIENT_ID", "jupyterhub")
c.GenericOAuthenticator.client_secret = secret("WORKBENCH_OAUTH_CLIENT_SECRET")
c.GenericOAuthenticator.oauth_callback_url = env(
    "JUPYTERHUB_OAUTH_CALLBACK_URL", "http://127.0.0.1:8001/hub/oauth_callback"
)
c.GenericOAuthenticator.authorize_url = env(
    "WORKBENCH_OAUTH_AUTHORIZE_URL", f"{workbench_url}/oauth/authorize/"
)
c.GenericOAuthenticator.token_url = env(
    "WORKBENCH_OAUTH_TOKEN_URL", f"{workbench_url}/oauth/token/"
)
c.GenericOAuthenticator.userdata_url = env(
    "WORKBENCH_OAUTH_USERDATA_URL", f"{workbench_url}/oauth/userinfo/"
)
c.GenericOAuthenticator.scope = ["profile"]
c.GenericOAuthenticator.username_claim = "username"
c.GenericOAuthenticator.enable_pkce = True

# --- who may do what ---------------------------------------------------------------------
c.JupyterHub.services = [
    # The workbench: creates hub users and starts/stops their servers.
    {"name": "workbench", "api_token": secret("WORKBENCH_SERVICE_TOKEN")},
    {
        "name": "idle-culler",
        "command": [
            sys.executable,
            "-m",
            "jupyterhub_idle_culler",
            f"--timeout={env('NOTEBOOK_IDLE_TIMEOUT_SECONDS', '3600')}",
            f"--max-age={env('NOTEBOOK_MAX_AGE_SECONDS', '28800')}",
            f"--cull-every={env('NOTEBOOK_CULL_EVERY_SECONDS', '60')}",
            "--remove-named-servers=True",
        ],
    },
]
c.JupyterHub.load_roles = [
    {"name": "workbench", "scopes": ["admin:users", "servers"], "services": ["workbench"]},
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    },
    # Users open and stop their servers, but start them only from the workbench, which
    # hands each one its token and the data it was granted.
    {
        "name": "user",
        "scopes": [
            "read:users!user",
            "users:activity!user",
            "read:servers!user",
            "delete:servers!user",
            "access:servers!user",
        ],
    },
]
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = int(env("NOTEBOOK_MAX_SERVERS_PER_USER", "2"))
c.JupyterHub.redirect_to_server = False
# Answer a start request at once (202): the workbench shows "starting" and polls, rather
# than holding its request open for the hub's default ten seconds.
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}

# --- servers -----------------------------------------------------------------------------
WORKBENCH_ENV = (
    "WORKBENCH_URL",
    "WORKBENCH_TOKEN",
    "WORKBENCH_TENANT",
    "WORKBENCH_NOTEBOOK",
    "WORKBENCH_DATASETS",
    "MLFLOW_TRACKING_URI",
)


def apply_user_options(spawner, user_options):  # type: ignore[no-untyped-def]
    """Take the workbench's per-server environment, and nothing else, from user_options."""
    given = (user_options or {}).get("env") or {}
    if not isinstance(given, dict) or not given.get("WORKBENCH_TOKEN"):
        raise web.HTTPError(400, "Start notebook servers from the workbench's Notebooks page.")
    extra = {k: str(given[k]) for k in WORKBENCH_ENV if isinstance(given.get(k), str)}
    spawner.environment = {**spawner.environment, **extra}


c.Spawner.apply_user_options = apply_user_options
c.Spawner.default_url = "/lab"
c.Spawner.http_timeout = 60
c.Spawner.start_timeout = 120
c.Spawner.env_keep = ["PATH", "LANG", "JUPYTERHUB_SINGLEUSER_APP"]

spawner = env("WORKBENCH_HUB_SPAWNER", "local")
if spawner == "local":
    # One process per server, as the hub's own OS user, homes under the data directory;
    # each server listens on loopback only.
    c.JupyterHub.spawner_class = "simple"
    c.SimpleLocalProcessSpawner.home_dir_template = str(data_dir / "home" / "{username}")
    c.Spawner.ip = env("JUPYTERHUB_SINGLEUSER_IP", "127.0.0.1")
    c.Spawner.cmd = [str(Path(sys.executable).with_name("jupyterhub-singleuser"))]
    if os.geteuid() == 0:
        c.Spawner.args = ["--allow-root"]
elif spawner == "docker":
    c.JupyterHub.spawner_class = "dockerspawner.DockerSpawner"
    c.DockerSpawner.image = env("NOTEBOOK_IMAGE", "quay.io/jupyter/scipy-notebook:2024-10-07")
    # compose.yaml's notebooks network: only web and the hub are there with the servers.
    c.DockerSpawner.network_name = env("DOCKER_NETWORK_NAME", "workbench_notebooks")
    c.DockerSpawner.remove = True  # ephemeral: what lasts is in MLflow and the workbench
    c.DockerSpawner.name_template = "nb-{username}-{servername}"
elif spawner == "kubernetes":
    # Pod image, resources and storage come from the KubeSpawner's own traits (README).
    c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
else:
    raise ValueError(f"WORKBENCH_HUB_SPAWNER={spawner!r}: use local, docker or kubernetes")
