"""Leases on rows a worker works on: the heartbeat that keeps one, and the broker check
reapers use before they send a task again.

A row that says ``running`` belongs to the worker whose attempt it names for as long as that
worker renews its lease (a fenced conditional UPDATE of its heartbeat). A reaper gives the
row to another attempt once the lease has run out; the old worker then finds its writes
fenced off and stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import connection

log = logging.getLogger(__name__)

# Retries after a failed renewal wait 1, 2, 4, ... heartbeat intervals, never more than this:
# the default five tries then fit well inside a 30 s lease.
MAX_BACKOFF_SECONDS = 5.0


class Heartbeat:
    """A daemon thread that renews a lease every ``every`` seconds through ``renew``.

    ``renew`` returns whether the lease is still this worker's. A database error does not
    end the thread: the thread's connection is closed (the next try opens a fresh one) and
    the renewal is retried with backoff. After ``max_failures`` consecutive failures it gives
    up: :attr:`lost` turns true and the thread ends, for the worker to stop and write
    nothing; the row is left for the reaper, which re-queues it once the lease has run out.

    :attr:`expired` covers a renewal that hangs (a database host that never answers): the
    lease is as good as lost once no renewal succeeded for ``lease_seconds``, because a
    reaper may have handed the row to another worker by then.
    """

    def __init__(
        self,
        renew: Callable[[], bool],
        *,
        every: float,
        lease_seconds: float,
        max_failures: int,
        name: str,
    ) -> None:
        self.renew = renew
        self.every = every
        self.lease_seconds = lease_seconds
        self.max_failures = max_failures
        self.lost = False
        self.gave_up = False
        self.failures = 0  # consecutive
        self._renewed_at = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, name=name, daemon=True)

    @property
    def expired(self) -> bool:
        return time.monotonic() - self._renewed_at > self.lease_seconds

    @property
    def held(self) -> bool:
        """Whether the worker may still act for the row (cheap: no database call)."""
        return not self.lost and not self.expired

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Renew now rather than at the next interval (a phase change to report)."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _beat_forever(self) -> None:
        try:
            wait = self.every
            while True:
                self._wake.wait(wait)
                self._wake.clear()
                if self._stop.is_set():
                    break
                wait = self._beat_once()
                if self.lost:
                    break
        finally:
            _close_connection()

    def _beat_once(self) -> float:
        """One renewal; returns how long to wait before the next one."""
        try:
            held = self.renew()
        except Exception:
            self.failures += 1
            _close_connection()  # a broken connection is not reused by the next try
            if self.failures >= self.max_failures:
                log.error(
                    "lease renewal failed %d times in a row; giving the work up",
                    self.failures,
                    exc_info=True,
                    extra={"lease": self._thread.name},
                )
                self.gave_up = True
                self.lost = True
                return self.every
            log.warning(
                "lease renewal failed (%d of %d); retrying",
                self.failures,
                self.max_failures,
                exc_info=True,
                extra={"lease": self._thread.name},
            )
            return min(self.every * 2 ** (self.failures - 1), MAX_BACKOFF_SECONDS)
        self.failures = 0
        if held:
            self._renewed_at = time.monotonic()
        else:
            self.lost = True
        return self.every


def _close_connection() -> None:
    try:
        connection.close()
    except Exception:
        log.debug("closing a broken database connection failed", exc_info=True)


def queue_depth(queue: str) -> int | None:
    """How many messages wait in ``queue`` on the broker (not those a worker holds);
    None when the broker cannot be asked.

    Reapers read it before they send a task again: a message still waiting behind others
    is not lost, and sending a second one would only queue a duplicate behind it.
    """
    from workbench.celery import app

    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            channel: Any = conn.default_channel
            declared = channel.queue_declare(queue=queue, passive=False)
            return int(declared.message_count)
    except Exception:
        log.warning("could not read the depth of queue %r", queue, exc_info=True)
        return None


def holder_gone(holder: str) -> bool:
    """Whether the worker process a lease names (``host:pid``, as
    ``apps.training.runner.worker_name`` writes it) is known dead: it ran on this host and
    no such process is alive here now (a zombie counts as dead). A holder on another host
    is never known dead from here: its lease running out says so.

    What a SIGKILLed pool process leaves: its master sends the task again at once
    (``reject_on_worker_lost``), and the next claim need not wait out the lease.
    """
    import os
    import socket

    host, _, pid_text = holder.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid in (0, os.getpid()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def gone_holders(running: Any) -> list[Any]:
    """The primary keys of the rows of ``running`` (a queryset of running rows with a
    ``claimed_by``) whose holder is known dead (:func:`holder_gone`)."""
    return [pk for pk, holder in running.values_list("pk", "claimed_by") if holder_gone(holder)]


def lost_reason(holder: str, *, stale: bool) -> str | None:
    """Why a running row's worker counts as lost — its process is known dead here, or its
    lease ran out (``stale``) — as the reapers audit it; None while it holds the row."""
    if holder_gone(holder):
        return "worker process gone"
    return "heartbeat stale" if stale else None
