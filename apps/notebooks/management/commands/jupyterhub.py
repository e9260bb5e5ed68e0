"""``manage.py jupyterhub``: JupyterHub for the embedded stack, on loopback.

Registers the hub as the workbench's OAuth client, then becomes the hub process (exec),
with the environment ``hubconfig.embedded_hub_environment`` builds from the settings (every
socket on 127.0.0.1): the service token, cookie secret and OAuth secret come from there,
never from the repository.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.core.errors import DomainError
from apps.notebooks import hubconfig, services


class Command(BaseCommand):
    help = "Start JupyterHub (local-process spawner) signed in through this workbench."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--data-dir", default=str(Path(settings.VAR_DIR) / "jupyterhub"))
        parser.add_argument("--hub-port", type=int, default=8081, help="the hub's own API port")
        parser.add_argument("--proxy-api-port", type=int, default=8002)
        parser.add_argument(
            "--register-only",
            action="store_true",
            help="register the hub as OAuth client and exit (the hub runs elsewhere)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            services.hub_oauth_client_ensure(
                client_id=settings.JUPYTERHUB_OAUTH_CLIENT_ID,
                client_secret=settings.JUPYTERHUB_OAUTH_CLIENT_SECRET,
                redirect_uri=hubconfig.oauth_callback_url(),
            )
            if options["register_only"]:
                self.stdout.write(f"OAuth client registered for {hubconfig.oauth_callback_url()}")
                return
            env = hubconfig.embedded_hub_environment(
                data_dir=Path(options["data_dir"]),
                hub_port=options["hub_port"],
                proxy_api_port=options["proxy_api_port"],
            )
        except (DomainError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from exc
        if not settings.JUPYTERHUB_API_TOKEN:
            raise CommandError(
                "JUPYTERHUB_API_TOKEN is empty: the workbench could not call the hub"
            )
        hub = str(Path(sys.executable).with_name("jupyterhub"))
        self.stdout.write(
            f"JupyterHub on {settings.JUPYTERHUB_URL} (data in {options['data_dir']})"
        )
        self.stdout.flush()
        argv = [hub, "-f", str(hubconfig.CONFIG_FILE)]
        os.execve(hub, argv, {**os.environ, **env})  # noqa: S606 - becomes the hub, no shell
