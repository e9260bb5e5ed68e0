"""gunicorn settings for the web process: ``gunicorn -c workbench/gunicorn_conf.py workbench.wsgi``.

Also works around gunicorn reading request bodies 1 KiB at a time (and re-copying its
buffer on each step; gunicorn issue #2596): a 500 MB dataset upload spent ~2.5 s there.
``Body.read`` below asks the reader for everything still missing instead; the behaviour is
otherwise gunicorn's own. Remove it once gunicorn ships a read-size setting.
"""

from __future__ import annotations

import io
import os
from typing import Any

from gunicorn.http.body import Body

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "3"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "600"))  # big uploads are checked in-request
accesslog = "-"
# A request line (method, path and query) up to 8 KiB, as most proxies in front allow:
# gunicorn's default, 4 KiB, refused long filter queries with an HTML 400 of its own,
# before the API could answer in its JSON envelope. 8190 is the most gunicorn allows.
limit_request_line = 8190


# The application is prewarmed in each worker once it is loaded (post_worker_init), not
# on import (``wsgi.py``), so the worker keeps the database connection it warmed.
os.environ["WORKBENCH_PREWARM"] = "worker"


def post_worker_init(worker: Any) -> None:
    """In each worker, once the application is loaded: the prewarm of
    ``apps.deployments.dataplane`` (views, routes, replica sockets, one request through
    the stack, the predict path's reads), keeping its database connection open — a
    first connection costs a request several ms (SQLite registers Django's functions on
    connect) and a new one prepares every statement again."""
    from django.db import connection

    from apps.deployments.dataplane import prewarm

    prewarm(worker.wsgi, keep_connection=True)
    try:
        connection.ensure_connection()
    except Exception:  # the database is down: the first request reports it
        worker.log.warning("no database connection at worker start", exc_info=True)


def _read(self: Any, size: int | None = None) -> bytes:
    size = self.getsize(size)
    if size == 0:
        return b""
    while size > self.buf.tell():
        data = self.reader.read(max(size - self.buf.tell(), 1024))
        if not data:
            break
        self.buf.write(data)
    data = self.buf.getvalue()
    ret, rest = data[:size], data[size:]
    self.buf = io.BytesIO()
    self.buf.write(rest)
    return bytes(ret)


Body.read = _read
