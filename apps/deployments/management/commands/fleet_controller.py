"""``manage.py fleet_controller``: the one process that drives the serving fleet.

Runs :class:`apps.deployments.controller.Controller` until SIGTERM/SIGINT: holds the fleet
lease (a second controller waits as a standby and takes over within FLEET_LEASE_SECONDS
of the first one's death), reconciles, publishes routes and status. It touches its
heartbeat file on every turn of its loop, leader or standby.

``--check`` is its health check (compose, Kubernetes probes): exit 0 when the heartbeat
file is fresh (the process loops), and with ``--leader`` only when a controller also holds
a fresh lease (the fleet is being driven). ``--once`` runs a single pass and exits.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.deployments import controller as fleet_controller


def heartbeat_file() -> Path:
    return Path(settings.VAR_DIR) / "fleet-controller.heartbeat"


class Command(BaseCommand):
    help = "Run the fleet controller: reconcile the serving fleet with the database."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--check", action="store_true", help="health check, then exit")
        parser.add_argument(
            "--leader", action="store_true", help="with --check: a controller must hold the lease"
        )
        parser.add_argument("--once", action="store_true", help="one pass, then exit")

    def handle(self, *args: Any, **options: Any) -> None:
        limit = float(settings.FLEET_LEASE_SECONDS)
        if options["check"]:
            try:
                age = time.time() - heartbeat_file().stat().st_mtime
            except OSError as error:
                raise CommandError(f"no fleet controller heartbeat: {error}") from error
            if age > limit:
                raise CommandError(f"the fleet controller's heartbeat is {age:.0f} s old")
            if options["leader"] and not fleet_controller.lease_is_fresh(within_s=limit):
                raise CommandError("no fleet controller holds a fresh lease")
            self.stdout.write(f"ok (heartbeat {age:.1f} s ago)")
            return
        runner = fleet_controller.Controller()
        if options["once"]:
            if not fleet_controller.lease_acquire(holder=runner.holder, seconds=limit):
                raise CommandError("another fleet controller holds the lease")
            report = runner.reconcile()
            fleet_controller.lease_release(holder=runner.holder)
            self.stdout.write(str(report.__dict__))
            return

        def stop(signum: int, _frame: Any) -> None:
            self.stderr.write(f"fleet controller: signal {signum}, stopping")
            runner.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        beating = threading.Event()

        def beat() -> None:
            path = heartbeat_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            while not beating.wait(1.0):
                # Only while the loop moves: a wedged controller must look dead.
                if time.monotonic() - runner.last_turn < limit:
                    path.touch()

        path = heartbeat_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        threading.Thread(target=beat, name="controller-heartbeat", daemon=True).start()
        self.stderr.write(f"fleet controller {runner.holder} starting")
        try:
            runner.run()
        finally:
            beating.set()
            from worker.serving.fleet import close_all

            close_all()
        self.stderr.write("fleet controller stopped")
