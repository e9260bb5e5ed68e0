"""Checking a policy's gates against evaluation results: plain functions, easy to test."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}


def check_gates(
    *,
    gates: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    latency_budget_ms: float | None = None,
    max_regression: float | None = None,
    champion: dict[str, dict[str, Any]] | None = None,
    regression_metrics: tuple[str, ...] = ("macro_f1",),
    champion_names: dict[str, str] | None = None,
    latency_metric: str = "latency_ms_p95",
) -> list[dict[str, Any]]:
    """One row per gate and dataset: ``{gate, dataset, metric, op, threshold, value, passed}``.

    ``results`` maps dataset id -> evaluation metrics (``{"dataset_name", "macro_f1", ...}``).
    A gate without a dataset applies to every evaluated dataset; a gate naming a dataset that
    was not evaluated fails (a missing measurement never passes). With ``max_regression``,
    each of ``regression_metrics`` may fall at most that far below the champion's on each
    dataset the champion was measured on (``champion_names[dataset]`` says who that was, by
    default "champion": an embedding model is held to its un-tuned base where no production
    version was measured). ``latency_budget_ms`` bounds ``latency_metric`` (an autocomplete
    model's: per token).
    """
    rows: list[dict[str, Any]] = []
    effective = [dict(g) for g in gates]
    if latency_budget_ms is not None:
        effective.append(
            {
                "metric": latency_metric,
                "op": "<=",
                "value": latency_budget_ms,
                "dataset": None,
                "source": "latency budget",
            }
        )
    for gate in effective:
        datasets = [gate["dataset"]] if gate.get("dataset") else sorted(results)
        for dataset in datasets:
            metrics = results.get(dataset)
            value = metrics.get(gate["metric"]) if metrics else None
            passed = value is not None and OPS[gate["op"]](float(value), float(gate["value"]))
            rows.append({
                "gate": gate.get("source", "policy"),
                "dataset": dataset,
                "dataset_name": (metrics or {}).get("dataset_name", dataset),
                "metric": gate["metric"], "op": gate["op"], "threshold": float(gate["value"]),
                "value": None if value is None else float(value), "passed": passed,
            })  # fmt: skip
    if max_regression is not None and champion:
        for dataset, theirs in sorted(champion.items()):
            for metric in regression_metrics:
                ours = results.get(dataset, {}).get(metric)
                best = theirs.get(metric)
                if best is None:
                    continue
                threshold = float(best) - max_regression
                rows.append({
                    "gate": f"regression vs {(champion_names or {}).get(dataset, 'champion')}",
                    "dataset": dataset,
                    "dataset_name": results.get(dataset, {}).get("dataset_name", dataset),
                    "metric": metric, "op": ">=", "threshold": threshold,
                    "value": None if ours is None else float(ours),
                    # A hair of float noise (the same model measured twice) is no regression.
                    "passed": ours is not None and float(ours) >= threshold - 1e-9,
                    "champion_value": float(best),
                })  # fmt: skip
    return rows


def champion_delta(row: dict[str, Any]) -> float | None:
    """A regression gate row's value minus the champion's (or the yardstick's); None for
    any other row, or where either was not measured."""
    value, best = row.get("value"), row.get("champion_value")
    if not str(row.get("gate", "")).startswith("regression vs") or value is None or best is None:
        return None
    return float(value) - float(best)
