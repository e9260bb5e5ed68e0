"""The Celery app. Workers start with ``celery -A workbench worker -Q default,gpu``."""

import os

from celery import Celery
from kombu.transport import sqlalchemy as _sqla

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workbench.settings")

# The embedded broker (sqla+sqlite) polls its table; kombu's default of once a second put a
# second on every hop (POST runs/ -> running took 1.4 s p50, 0.1 s on Redis). Set on the
# transport class, not as a broker transport option: kombu hands this transport's options
# to SQLAlchemy's create_engine, which refuses ``polling_interval``. Redis is unaffected.
_sqla.Transport.polling_interval = 0.1

app = Celery("workbench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
