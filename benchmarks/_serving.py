"""What the serving-fleet benchmarks share: arguments, figures, machine facts, tiny models."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

from benchmarks._common import (
    ROOT,
    add_record_flags,
    commit,
    cpu_model,
    gpu,
    mem_total_gib,
    record,
)

__all__ = ["ROOT"]


def parser(doc: str, *, quick_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    add_record_flags(parser)
    return parser


def should_record(args: argparse.Namespace) -> bool:
    return bool(args.record) if args.record is not None else not args.quick


def med(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)``, or the value alone for one rep."""
    if len(values) == 1:
        return fmt.format(values[0])
    return (
        f"{fmt.format(statistics.median(values))} "
        f"({fmt.format(min(values))}-{fmt.format(max(values))})"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def machine_facts(extra_gpu_note: str = "") -> list[str]:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    import torch

    return [
        f"CPU: {cpu_model()}, {usable} usable of {cores} cores",
        f"memory: {mem_total_gib():.1f} GiB",
        f"GPU: {gpu()}{extra_gpu_note}",
        f"OS: {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}",
    ]


def table(rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| figure | project | reference | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def entry(name: str, body: str, notes: Sequence[str], tail: str = "") -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"### {name} — {when} — commit {commit()}\n\n{body}\n\n"
    text += "\n".join(f"- {note}" for note in notes) + "\n"
    return text + (f"\n{tail}\n" if tail else "")


def finish(text: str, args: argparse.Namespace) -> None:
    print("\n" + text)
    if should_record(args):
        record(text)
        print("recorded in benchmarks/README.md")


def tiny_tenant_model(work: Path) -> Path:
    """One tiny BERT trained (1 epoch) on a banking77 slice with the worker's own loop."""
    from tests.worker.serving.models import train_tiny

    return train_tiny(work / "train", seed=5, epochs=1)
