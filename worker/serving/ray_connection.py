"""The Ray Serve fleet's connection to its cluster: one driver per process, reconnected
when the cluster is lost (see :meth:`RayConnection.ensure_connected`). Part of
:class:`worker.serving.fleet.RayFleet`."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.serving import local_ray, ray_private
from worker.serving.fastpath import Endpoint, FastClient
from worker.serving.routing import (
    Route,
)

logger = logging.getLogger(__name__)

_FLEETS: weakref.WeakSet[RayConnection] = weakref.WeakSet()


@dataclass
class _Replica:
    """A running replica as the direct path knows it."""

    name: str  # its actor's name, in Serve's namespace
    endpoint: Endpoint | None  # its socket, if it published one
    actor: Any = None  # its actor handle, looked up on first use


def _raylet_gone(head: local_ray.LocalRay) -> bool:
    """The head's ``ray start --block`` runs but its raylet does not. Seen on a loaded
    2-core machine: a new head's raylet crashed at start (a failed check while it waited
    for its dashboard agent's ports) while ``ray start`` and the GCS ran on, so the GCS port
    answered and every driver's ``ray.init`` failed after a minute ("No node info found"):
    such a head is as dead as a stopped one."""
    for pid in local_ray._descendants(head.pid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name == "raylet" and local_ray._alive(pid):
            return False
    return True


def _joinable(head: local_ray.LocalRay) -> bool:
    """An embedded head a driver can join: running, its GCS answering, its raylet up."""
    return local_ray.is_alive(head) and not _raylet_gone(head)


class RayConnection:
    """A driver's connection to the Ray cluster, and the state every part of the fleet
    keeps (handles, routes, replica sockets)."""

    def __init__(
        self,
        *,
        address: str | None,
        namespace: str = "workbench",
        local_dir: Path,
        num_cpus_per_replica: float = 0.5,
        num_gpus_per_replica: float | None = None,
        autoscaling_options: Mapping[str, Any] | None = None,
        direct: bool = True,
        fast_path: bool = True,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self.local_dir = Path(local_dir)
        self.num_cpus_per_replica = num_cpus_per_replica
        # None: a tenth of a GPU per replica where the cluster has GPUs, none elsewhere.
        self.num_gpus_per_replica = num_gpus_per_replica
        # More of Serve's AutoscalingConfig (upscale_delay_s, downscale_delay_s,
        # look_back_period_s, ...) for every deployment; PoolSpec sets the rest.
        self.autoscaling_options = dict(autoscaling_options or {})
        self._lock = threading.Lock()
        self._connected = False
        self._head: local_ray.LocalRay | None = None  # the embedded head connected to
        self._gpus: float | None = None  # GPUs per replica, read once per connection
        self.direct = direct
        self.fast_path = fast_path
        self._fast = FastClient()
        self._fast_failed: dict[Endpoint, float] = {}
        self._replicas: dict[tuple[str, str], tuple[float, list[_Replica]]] = {}
        self._round_robin = 0
        self._routes: dict[str, dict[str, Route]] = {}
        self._handles: dict[tuple[str, str, str | None], Any] = {}
        _FLEETS.add(self)

    # --- connection ------------------------------------------------------------------

    def _connect(self, *, start: bool = True) -> bool:
        """Connect this process to Ray (starting the embedded head if ``start``)."""
        if self._connected:
            return True
        with self._lock:
            if self._connected:
                return True
            import ray

            ray_private.check_version()
            # A fleet driver only ever talks to its own cluster.
            ray_private.disable_auto_connect()
            address = self.address
            if address is None:
                head = self._embedded_head(start=start)
                if head is None:
                    return False
                local_ray.use_head_auth(head)
                address = head.address
                self._head = head
            elif not ray.is_initialized() and not self._head_alive():
                return False  # ray.init would wait a minute for a GCS that is not there
            if not ray.is_initialized():
                ray.init(
                    address=address,
                    namespace=self.namespace,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=False,
                )
            from ray import serve

            serve.start(proxy_location="Disabled")
            self._connected = True
            return True

    def lost(self) -> bool:
        """The cluster is gone: the one this driver was connected to, or (not connected
        yet, e.g. a controller just restarted) the head the state file names or the GCS
        at the address does not answer. Cheap: no reconnecting."""
        if self._connected:
            return not self._head_alive()
        if self.address is None:
            head = self._embedded_head(start=False)
            return head is None and (self.local_dir / local_ray.STATE_FILE).exists()
        return not self._head_alive()

    def ensure_connected(self) -> bool:
        """Connected to a live cluster, reconnecting when the one this driver knew is gone
        (a new head after the old one died: its GCS is new, Serve there starts empty and
        the controller applies every pool again). In embedded mode a dead head is replaced
        by a new one. False when no cluster answers; the fleet controller then reports
        every deployment as not served and tries again on its next pass.

        Ray ends a driver that loses its GCS for longer than its reconnect timeout (60 s),
        so this must run more often than that: the controller calls it on every pass."""
        if self._connected and not self._head_alive():
            logger.warning("the Ray cluster was lost; reconnecting")
            self._disconnect()
        if not self._connected and self.address is None:
            self._stop_broken_head()
        try:
            return self._connect(start=True)
        except Exception:
            logger.exception("cannot connect to the Ray cluster")
            self._disconnect()
            return False

    def _head_alive(self) -> bool:
        if self.address is None:
            return self._head is not None and _joinable(self._head)
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            return False

    def _disconnect(self) -> None:
        import ray

        self.close()
        self._routes.clear()
        with contextlib.suppress(Exception):  # the cluster is gone: nothing to say goodbye to
            ray.shutdown()
        self._connected = False
        self._head = None
        self._gpus = None

    def _embedded_head(self, *, start: bool) -> local_ray.LocalRay | None:
        if start:
            return local_ray.ensure_head(self.local_dir)
        head = self._recorded_head()
        return head if head is not None and _joinable(head) else None

    def _recorded_head(self) -> local_ray.LocalRay | None:
        """The embedded head the state file names, running or not."""
        state = self.local_dir / local_ray.STATE_FILE
        try:
            return local_ray.LocalRay(**json.loads(state.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _stop_broken_head(self) -> None:
        """Stop the embedded head the state file names if it runs but cannot be joined, so
        that the connect that follows starts a new one."""
        head = self._recorded_head()
        if head is not None and local_ray.is_alive(head) and _raylet_gone(head):
            logger.error("the embedded Ray head %s lost its raylet; starting a new one", head.pid)
            local_ray.stop_head(head.pid)

    def close(self) -> None:
        """Let go of this driver's Serve handles and replica sockets. Call it before
        disconnecting from Ray: a handle's threads otherwise keep reporting to a controller
        they can no longer reach, and log it. The fleet reconnects on its next call."""
        for handle in self._handles.values():
            with contextlib.suppress(Exception):  # already shut, or Ray already gone
                handle.shutdown()
        self._handles.clear()
        self._replicas.clear()
        self._fast.close()
