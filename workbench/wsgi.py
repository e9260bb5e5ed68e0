import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workbench.settings")
application = get_wsgi_application()

# The first request of a fresh process should cost what the next ones do: views imported,
# the published routes read, a connection open to each replica, and one request through
# the middleware and DRF (best effort).
# Under gunicorn (``gunicorn_conf.py`` sets WORKBENCH_PREWARM=worker) each worker does it
# after loading instead, keeping its database connection.
if os.environ.get("WORKBENCH_PREWARM", "true").lower() not in ("0", "false", "no", "worker"):
    from apps.deployments.dataplane import prewarm

    prewarm(application)
