from __future__ import annotations

import time
from pathlib import Path

from celery import shared_task
from django.conf import settings

STALE_UPLOAD_SECONDS = 24 * 3600


@shared_task(name="core.cleanup_stale_uploads", soft_time_limit=120, time_limit=180)
def cleanup_stale_uploads() -> int:
    """Remove upload temp files a crashed web process left behind (run hourly by beat)."""
    cutoff = time.time() - STALE_UPLOAD_SECONDS
    removed = 0
    for path in Path(settings.UPLOAD_TMP_DIR).glob("upload-*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


@shared_task(name="core.ping", soft_time_limit=10, time_limit=20)
def ping() -> str:
    return "pong"
