"""JupyterHub in the compose stack: the workbench signs users in (OAuth 2), every value
from the environment so the same file serves any deployment of the stack."""

import os

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - injected by JupyterHub

c.JupyterHub.bind_url = "http://:8000"
c.JupyterHub.db_url = os.environ.get(
    "JUPYTERHUB_DB_URL", "sqlite:////srv/jupyterhub/data/jupyterhub.sqlite"
)
c.JupyterHub.cookie_secret_file = "/srv/jupyterhub/data/jupyterhub_cookie_secret"  # noqa: S105 - a path

# Users sign in at the workbench; the hub never sees a password.
c.JupyterHub.authenticator_class = "generic-oauth"
c.GenericOAuthenticator.client_id = os.environ.get("WORKBENCH_OAUTH_CLIENT_ID", "")
c.GenericOAuthenticator.client_secret = os.environ.get("WORKBENCH_OAUTH_CLIENT_SECRET", "")
c.GenericOAuthenticator.oauth_callback_url = os.environ.get("JUPYTERHUB_OAUTH_CALLBACK_URL", "")
c.GenericOAuthenticator.authorize_url = os.environ.get("WORKBENCH_OAUTH_AUTHORIZE_URL", "")
c.GenericOAuthenticator.token_url = os.environ.get("WORKBENCH_OAUTH_TOKEN_URL", "")
c.GenericOAuthenticator.userdata_url = os.environ.get("WORKBENCH_OAUTH_USERDATA_URL", "")
c.GenericOAuthenticator.username_claim = "username"
c.GenericOAuthenticator.allow_all = True  # the workbench decides who may sign in

# One process per user, as the hub user, with a home under the data volume.
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "/srv/jupyterhub/data/home/{username}"
c.Spawner.default_url = "/lab"
c.Spawner.environment = {
    name: os.environ[name]
    for name in ("WORKBENCH_URL", "MLFLOW_TRACKING_URI")
    if name in os.environ
}
