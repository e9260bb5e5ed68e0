"""Prometheus metrics shared by web and worker processes (multiprocess mode)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.registry import Collector

HTTP_REQUEST_SECONDS = Histogram(
    "workbench_http_request_duration_seconds",
    "Time to answer an HTTP request, by route pattern, method and status.",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TASKS_TOTAL = Counter(
    "workbench_tasks_total", "Celery tasks finished, by task name and outcome.", ["task", "outcome"]
)
TASK_SECONDS = Histogram(
    "workbench_task_duration_seconds",
    "Run time of Celery tasks, by task name and outcome.",
    ["task", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)


# Collectors that read their figures at scrape time (e.g. open fleet alerts from the
# database); apps add theirs in AppConfig.ready().
SCRAPE_TIME_COLLECTORS: list[Collector] = []


def render() -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    for collector in SCRAPE_TIME_COLLECTORS:
        registry.register(collector)
    return generate_latest(registry)
