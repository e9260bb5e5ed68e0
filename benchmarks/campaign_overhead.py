"""A retraining campaign over many tenants: its wall time against its runs' own training time.

    .venv/bin/python benchmarks/campaign_overhead.py            # full: 200 tenants
    .venv/bin/python benchmarks/campaign_overhead.py --quick    # CI smoke: 10 tenants

A throwaway workbench on a fresh ``WORKBENCH_VAR_DIR`` (SQLite DB, local artifact store,
MLflow on SQLite) and Redis (``redis://127.0.0.1:6379/9``): N tenants, each with a small
banking77 training set (6 intents x 10 rows) and a golden set (6 x 4), and one Celery
worker, ``celery -A workbench worker -Q default,gpu --concurrency C`` (C = ``--slots``, 1 by
default: one training slot, as one GPU; ``TRAINING_MAX_CONCURRENT_RUNS`` = C). A staff
user's campaign (``apps.campaigns.services.campaign_create``: all tenants, tiny-bert with 1
epoch, target staging) is started, and the benchmark waits until every item has left
pending / training / checking. Nothing else drives it: the campaign moves on by the tasks
its own runs and promotions send (no beat).

* A, the project: the campaign's wall time, from its creation to its last item checked by
  the gates (and, apart, to its last run's end).
* B, the reference: the sum of its runs' and evaluations' own times (each one's
  ``started_at`` to ``finished_at``: the task as the worker ran it, fixed costs included)
  over C — evaluations run on the training slots too — i.e. the same work back to back on
  the same slots with no orchestration at all.

Overhead = A / B - 1 (target <= 10 %). Also recorded: the longest start delay (a run's
creation to its start), the mean gap between one run's end and the next run's start on a
slot, and the items per outcome. The full run prepends its table to
``benchmarks/README.md``; ``--quick`` records only with ``--record``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    README,
    Process,
    add_record_flags,
    commit,
    cpu_model,
    gpu,
    launch,
    mem_total_gib,
    record,
)
from benchmarks.run_start_latency import (
    BANKING77,
    ENV_DROP,
    REDIS_URL,
    banking_slice,
    django_env,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGET_OVERHEAD = 0.10
PARAMS = {"epochs": 1, "batch_size": 16, "max_length": 32, "learning_rate": 0.003}


def setup(var_dir: Path, tenants: int) -> Any:
    """Django in this process; migrate; the tenants with their data; the staff user."""
    for key in ENV_DROP:
        os.environ.pop(key, None)
    os.environ.update(django_env(var_dir))
    sys.path.insert(0, str(ROOT))
    import hashlib
    import secrets

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from apps.datasets.services import dataset_create, dataset_version_create
    from apps.tenants import services as tenant_services

    call_command("migrate", interactive=False, verbosity=0)
    staff = tenant_services.user_create(
        username="campaigner", password=secrets.token_urlsafe(24), is_staff=True
    )
    train, golden = banking_slice(per_label=10), banking_slice(per_label=4, offset=10)
    for i in range(tenants):
        tenant = tenant_services.tenant_create(actor=None, slug=f"t{i:04d}", name=f"Tenant {i}")
        for name, kind, data in (("intents", "training", train), ("golden", "golden", golden)):
            dataset = dataset_create(actor=staff, tenant=tenant, name=name, kind=kind,
                                     task="text-classification")  # fmt: skip
            upload = Path(tempfile.mkdtemp(dir=settings.UPLOAD_TMP_DIR)) / f"{name}.csv"
            upload.write_bytes(data)
            dataset_version_create(
                actor=staff, dataset=dataset, path=upload,
                sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                filename=f"{name}.csv", text_column="text", label_column="label",
            )  # fmt: skip
    return staff


def worker(work: Path, var_dir: Path, slots: int) -> Process:
    env = {**django_env(var_dir), "CELERY_BROKER_URL": REDIS_URL, "LOG_LEVEL": "INFO",
           "TRAINING_WORK_DIR": str(work / "training"),
           "TRAINING_MAX_CONCURRENT_RUNS": str(slots),
           "TRAINING_MAX_CONCURRENT_RUNS_PER_TENANT": str(slots)}  # fmt: skip
    return Process(
        "celery worker",
        [str(BIN / "celery"), "-A", "workbench", "worker", "-Q", "default,gpu",
         "--concurrency", str(slots), "--loglevel", "INFO", "-n", f"campaign-{os.getpid()}@%h"],
        env,
        work / "worker.log",
    )  # fmt: skip


def measure(staff: Any, tenants: int, slots: int, timeout: float) -> dict[str, Any]:
    from django.conf import settings

    from apps.campaigns import services
    from apps.campaigns.models import MOVING, CampaignItem
    from apps.training.models import TrainingRun

    settings.TRAINING_MAX_CONCURRENT_RUNS = slots
    started = time.time()
    campaign = services.campaign_create(
        actor=staff, name="benchmark", model_name="intents", selection={"tenants": "all"},
        recipe={"base_model": "tiny-bert", "params": PARAMS}, target="staging",
    )  # fmt: skip
    created_at = campaign.created_at
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while CampaignItem.objects.filter(campaign=campaign, state__in=MOVING).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the campaign did not settle within {timeout:.0f} s")
        if time.monotonic() - last_print > 15:
            counts = services.item_counts(campaign)
            print(f"  {time.time() - started:6.0f} s: {counts}", flush=True)
            last_print = time.monotonic()
        time.sleep(0.5)
    settled_at = max(CampaignItem.objects.filter(campaign=campaign).values_list(
        "updated_at", flat=True))  # fmt: skip
    runs = list(
        TrainingRun.objects.filter(campaign_item__campaign=campaign)
        .order_by("started_at")
        .values_list("created_at", "started_at", "finished_at", "status")
    )
    done = [(c, s, f) for c, s, f, status in runs if s and f and status == "succeeded"]
    own = [(f - s).total_seconds() for _, s, f in done]
    delays = [(s - c).total_seconds() for c, s, _ in done]
    ends = sorted(f for *_, f in done)
    starts = sorted(s for _, s, _ in done)
    gaps = [(b - a).total_seconds() for a, b in zip(ends[:-1], starts[slots:], strict=False)]
    train_wall = (ends[-1] - created_at).total_seconds() if ends else float("nan")
    from apps.evaluation.models import Evaluation

    evaluations = [
        (f - s).total_seconds()
        for s, f in Evaluation.objects.filter(
            model_version__run__campaign_item__campaign=campaign,
            started_at__isnull=False, finished_at__isnull=False,
        ).values_list("started_at", "finished_at")
    ]  # fmt: skip
    whole_wall = (settled_at - created_at).total_seconds()
    reference = (sum(own) + sum(evaluations)) / slots
    return {
        "evaluations": len(evaluations),
        "eval_s": sum(evaluations),
        "train_s": sum(own),
        "whole_overhead": whole_wall / reference - 1 if reference else float("nan"),
        "tenants": tenants,
        "slots": slots,
        "runs": len(runs),
        "succeeded": len(done),
        "train_wall_s": train_wall,
        "reference_s": reference,
        "whole_wall_s": whole_wall,
        "mean_run_s": statistics.fmean(own) if own else float("nan"),
        "longest_delay_s": max(delays) if delays else float("nan"),
        "mean_gap_s": statistics.fmean(gaps) if gaps else float("nan"),
        "counts": services.item_counts(campaign),
        "skipped": services.skip_counts(campaign),
        "progress": services.campaign_progress(campaign),
    }


def report(r: dict[str, Any], *, quick: bool) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    met = "yes" if r["whole_overhead"] <= TARGET_OVERHEAD else "NO"
    mode = " (--quick)" if quick else ""
    lines = [
        f"### campaign_overhead{mode} — {when} — commit {commit()}",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {mem_total_gib():.0f} GiB, "
        f"{gpu()}; Python {platform.python_version()}; load average "
        f"{os.getloadavg()[0]:.2f} at the end. {r['tenants']} tenants, {r['slots']} training "
        f"slot(s), tiny-bert {PARAMS}, 60 training rows and 24 golden rows per tenant; "
        "SQLite, Redis, one Celery worker.",
        "",
        "| measure | project | reference | ratio | target | met |",
        "|---|---|---|---|---|---|",
        f"| campaign wall time (created -> every item's gates checked) | "
        f"{r['whole_wall_s']:.1f} s | its runs' and evaluations' own times back to back on "
        f"{r['slots']} slot(s): ({r['train_s']:.1f} s training + {r['eval_s']:.1f} s "
        f"evaluating, {r['evaluations']} evaluations) / {r['slots']} = {r['reference_s']:.1f} s "
        f"| overhead {100 * r['whole_overhead']:.1f} % | <= {100 * TARGET_OVERHEAD:.0f} % "
        f"| {met} |",
        f"| training wall time (created -> last run ended) | {r['train_wall_s']:.1f} s | — | — "
        "| — | — |",
        f"| mean run (its own start to end) | {r['mean_run_s']:.2f} s | — | — | — | — |",
        f"| mean gap, a slot's run ended -> its next run started | {r['mean_gap_s']:.2f} s | "
        "— | — | — | — |",
        f"| longest start delay (a run's creation -> its start) | {r['longest_delay_s']:.1f} s "
        "| — | — | — | — |",
        f"| runs (succeeded) | {r['runs']} ({r['succeeded']}) | — | — | — | — |",
        f"| items by status | {r['counts']}, skipped {r['skipped']} | — | — | — | — |",
        f"| GPU-seconds (the campaign's own figure) | {r['progress'].gpu_seconds:.0f} | — | — "
        "| — | — |",
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="campaign-overhead-"))
    proc: Process | None = None
    try:
        var_dir = work / "var"
        print(f"setting up {args.tenants} tenants with data ...", flush=True)
        staff = setup(var_dir, args.tenants)
        from workbench.celery import app

        app.conf.broker_url = REDIS_URL
        app.control.purge()
        proc = worker(work, var_dir, args.slots)
        proc.start()
        deadline = time.monotonic() + 90
        while "ready." not in proc.log_path.read_text(errors="replace"):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{proc.log_tail()}")
            time.sleep(0.2)
        print("campaign started ...", flush=True)
        result = measure(staff, args.tenants, args.slots, timeout=args.timeout)
        entry = report(result, quick=args.quick)
        print("\n" + entry)
        if args.record:
            record(entry)
            print(f"recorded in {README.relative_to(ROOT)}")
        return 0
    except Exception:
        if proc is not None:
            print(f"--- worker log tail ---\n{proc.log_tail()}", file=sys.stderr)
        raise
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 tenants (CI smoke)")
    parser.add_argument("--tenants", type=int, help="tenants (default 200; 10 with --quick)")
    parser.add_argument("--slots", type=int, default=1, help="training slots (worker processes)")
    parser.add_argument("--timeout", type=float, default=7200.0)
    add_record_flags(parser)
    args = parser.parse_args(argv)
    args.tenants = args.tenants or (10 if args.quick else 200)
    return launch(parser, args, run, data=BANKING77)


if __name__ == "__main__":
    sys.exit(main())
