"""Decoding an autocomplete model: per-token latency of a 16-token greedy completion with the
key/value cache against recomputing the whole sequence each step, and 8 concurrent
completions against 8 in a row, in-process and through the REST complete endpoint.

    .venv/bin/python benchmarks/autocomplete_decoding.py           # full: 3 reps
    .venv/bin/python benchmarks/autocomplete_decoding.py --quick   # smoke: 1 rep, few calls
    .venv/bin/python benchmarks/autocomplete_decoding.py --model random --no-rest

What runs, on a fresh workbench (``benchmarks/_embedding.py``'s ``Bench``: SQLite, local
artifact store, a private local Ray head, gunicorn):

* the model (``--model``): ``trained`` — banks_1's train replies of
  ``../shared/datasets/sgd-replies`` uploaded as a text-generation dataset version and a
  ``tiny-gpt2`` run of the catalogue's shape trained briefly (``--epochs``) by the
  workbench's runner, its registered artifact loaded back as a
  ``worker.autocomplete.Completer``; ``random`` — the catalogue's shape with random
  weights and a tokenizer learnt on the same replies, registered as a version (timing
  only); ``auto`` (default) — trained where the catalogue can train it.
  The entry says which.
* prompts: banks_1's test replies typed to a word boundary (prefix + the customer's
  message as context), sampled (seeded); those whose greedy completion decodes at least
  16 tokens (``Completion.tokens``: the tokens that spell out the typed last word again,
  token healing, included) are the ones timed, so every call is a 16-token completion.

1. cache against recompute, in this process on one torch thread (a replica's): A
   ``Completer.complete(prefix, context, max_tokens=16)`` (``past_key_values`` reused
   step to step), B the same with ``use_cache=False`` (every step a forward pass over the
   whole sequence so far), interleaved call by call after a warm-up; the two texts must be
   equal. Milliseconds per generated token, p50/p99 per side; the ratio B/A of the p50s
   (target ≥ 3x).
2. 8 concurrent against 8 in a row, in-process: A ``complete_batch`` of 8 prompts (one
   padded forward per step), B the 8 through ``complete`` one after another; the results
   must be equal. Completions per second over at least 10 s of calls per side and rep,
   the ratio A/B (recorded; no target).
3. the same through the deployed model: the version evaluated on 30 test replies (a golden
   set: the warm-up compares its samples), approved for production (replica warm
   on the local Ray), gunicorn with 8 sync workers so 8 requests reach the replica at once;
   A 8 threads each posting one ``POST /api/v1/tenants/{t}/models/{name}/complete`` at the
   same moment (a barrier), B the same 8 posted one after another on one connection; the
   served texts must equal the in-process ones. Completions per second, the ratio A/B.

The quick run takes a few minutes; the full run ~10-15 min on 2 shared cores, most of it
the training run and the Ray head's start. The full run prepends its table to
``benchmarks/README.md``; ``--quick`` records only with ``--record``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _serving
from benchmarks._autocomplete import (
    REPLICA_THREADS,
    SGD,
    AutocompleteBench,
    Position,
    can_train,
    positions,
    random_completer,
    read_replies,
)
from benchmarks._embedding import load_avg

SERVICE = "banks_1"
MAX_TOKENS = 16
CONCURRENT = 8
TARGET_CACHE_SPEEDUP = 3.0
WARMUP_CALLS = 10
GOLDEN_REPLIES = 30  # the evaluation the warm-up needs: a few replies, seconds


def timed_ms(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - started) * 1000


def full_length(completer: Any, pool: Sequence[Position], wanted: int) -> list[Position]:
    """The prompts of ``pool`` (in order) whose greedy completion runs to MAX_TOKENS: at
    least that many tokens decoded (``Completion.tokens`` counts the ones that spell out
    the typed word again, token healing, which max_tokens does not)."""
    found = []
    for p in pool:
        if completer.complete(p.prefix, p.context, max_tokens=MAX_TOKENS)[0].tokens >= MAX_TOKENS:
            found.append(p)
            if len(found) >= wanted:
                break
    return found


def cache_vs_recompute(
    completer: Any, prompts: Sequence[Position], calls: int, rng: random.Random
) -> dict[str, list[float]]:
    """Per-token ms of each side, interleaved call by call (A B, B A, ...)."""
    per_token: dict[str, list[float]] = {"cache": [], "recompute": []}
    for call in range(calls):
        p = rng.choice(prompts)
        sides = [("cache", True), ("recompute", False)]
        if call % 2:  # alternate which goes first: neither always gets the warm caches
            sides.reverse()
        texts = {}
        for name, use_cache in sides:
            out, ms = timed_ms(
                completer.complete, p.prefix, p.context, max_tokens=MAX_TOKENS,
                use_cache=use_cache,
            )  # fmt: skip
            per_token[name].append(ms / max(1, out[0].tokens))
            texts[name] = out[0].text
        if texts["cache"] != texts["recompute"]:
            raise RuntimeError(
                f"cached and recomputed greedy completions differ for {p.prefix!r}: "
                f"{texts['cache']!r} != {texts['recompute']!r}"
            )
    return per_token


def throughput(
    sides: dict[str, Any], prompts: Sequence[Position], seconds: float, rng: random.Random
) -> tuple[dict[str, float], int]:
    """Completions per second of each side over at least ``seconds`` of its calls, groups
    of CONCURRENT prompts, interleaved group by group."""
    spent = {name: 0.0 for name in sides}
    done = 0
    while min(spent.values()) < seconds:
        group = rng.sample(list(prompts), CONCURRENT)
        for name, fn in sides.items():
            started = time.perf_counter()
            fn(group)
            spent[name] += time.perf_counter() - started
        done += CONCURRENT
    return {name: done / s for name, s in spent.items()}, done


def in_process_sides(completer: Any) -> dict[str, Any]:
    def batched(group: Sequence[Position]) -> list[str]:
        out = completer.complete_batch([(p.prefix, p.context) for p in group],
                                       max_tokens=MAX_TOKENS)  # fmt: skip
        return [c.text for c in out]

    def in_a_row(group: Sequence[Position]) -> list[str]:
        return [completer.complete(p.prefix, p.context, max_tokens=MAX_TOKENS)[0].text
                for p in group]  # fmt: skip

    return {"concurrent": batched, "in_a_row": in_a_row}


def rest_sides(bench: AutocompleteBench, name: str) -> dict[str, Any]:
    path = f"/api/v1/tenants/{bench.tenant.slug}/models/{name}/complete"
    clients = [bench.client() for _ in range(CONCURRENT)]

    def post(client: Any, p: Position) -> str:
        body = {"prefix": p.prefix, "context": p.context, "max_tokens": MAX_TOKENS}
        status, answer = client.post(path, body)
        if status != 200:
            raise RuntimeError(f"complete answered {status}: {answer}")
        return str(answer["completions"][0]["text"])

    def concurrent(group: Sequence[Position]) -> list[str]:
        texts: list[str] = [""] * len(group)
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(group))

        def one(i: int) -> None:
            try:
                barrier.wait()
                texts[i] = post(clients[i], group[i])
            except BaseException as exc:  # reported by the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(group))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return texts

    def in_a_row(group: Sequence[Position]) -> list[str]:
        return [post(clients[0], p) for p in group]

    return {"concurrent": concurrent, "in_a_row": in_a_row}


def run(args: argparse.Namespace) -> int:
    import torch

    reps = 1 if args.quick else args.reps
    calls = 30 if args.quick else args.calls
    seconds = 2.0 if args.quick else 10.0
    train_replies = read_replies(SERVICE, "train")
    test_positions = list(positions(read_replies(SERVICE, "test")))
    rng = random.Random(0)
    rng.shuffle(test_positions)

    model = args.model
    why_random = ""
    if model == "auto":
        why_random = can_train()
        model = "random" if why_random else "trained"
    load_start = load_avg()
    started_all = time.perf_counter()
    bench = AutocompleteBench()
    facts: dict[str, Any] = {"model": model, "why_random": why_random, "load_start": load_start}
    rest: list[dict[str, float]] = []
    rest_note = "not measured (--no-rest)" if args.no_rest else ""
    try:
        bench.start()
        own_threads = torch.get_num_threads()
        data = bench.reply_version(f"{SERVICE}-train", train_replies)
        if model == "trained":
            print(f"training tiny-gpt2 on {SERVICE} ({args.epochs} epochs) ...", flush=True)
            version, train_s = bench.train_autocomplete(data, "replies", {"epochs": args.epochs})
            facts["train_s"] = train_s
            facts["val"] = {k: v for k, v in (version.run.metrics or {}).items()
                            if k.startswith("val_")}  # fmt: skip
            facts["params"] = version.run.params
            completer = bench.completer(version)
        else:
            model_dir = Path(tempfile.mkdtemp(dir=bench.var)) / "model"
            completer = random_completer(model_dir, train_replies)
            version = bench.register_dir(model_dir, data, "replies")
        torch.set_num_threads(REPLICA_THREADS)
        pool = test_positions[: 400 if args.quick else 1500]
        prompts = full_length(completer, pool, 60 if args.quick else 200)
        facts["prompts"], facts["pool"] = len(prompts), len(pool)
        if len(prompts) < CONCURRENT:
            raise RuntimeError(f"only {len(prompts)} prompts decode {MAX_TOKENS} tokens")
        print(f"{len(prompts)} of {len(pool)} sampled prompts decode {MAX_TOKENS}+ tokens")
        cache_vs_recompute(completer, prompts, WARMUP_CALLS, rng)  # warm-up, untimed
        latency = []
        for rep in range(reps):
            times = cache_vs_recompute(completer, prompts, calls, rng)
            latency.append(times)
            print(f"latency rep {rep + 1}: per token p50 cache "
                  f"{statistics.median(times['cache']):.2f} ms, recompute "
                  f"{statistics.median(times['recompute']):.2f} ms", flush=True)  # fmt: skip
        # Where the cache saves most: the longest prompts (a long customer message), the
        # fifth of the timed prompts with the most prompt tokens.
        lengths = {p: len(completer.prompt_ids(p.prefix, p.context)) for p in prompts}
        facts["prompt_tokens"] = statistics.median(lengths.values())
        longest = sorted(prompts, key=lambda p: lengths[p])[-max(CONCURRENT, len(prompts) // 5) :]
        facts["long_tokens"] = min(lengths[p] for p in longest)
        long_latency = cache_vs_recompute(completer, longest, max(30, calls // 3), rng)
        facts["long_latency"] = long_latency
        print(f"longest prompts (>= {facts['long_tokens']} tokens): per token p50 cache "
              f"{statistics.median(long_latency['cache']):.2f} ms, recompute "
              f"{statistics.median(long_latency['recompute']):.2f} ms", flush=True)  # fmt: skip

        sides = in_process_sides(completer)
        for group in (prompts[:CONCURRENT], prompts[CONCURRENT : 2 * CONCURRENT]):
            if len(group) == CONCURRENT and sides["concurrent"](group) != sides["in_a_row"](group):
                raise RuntimeError("complete_batch differs from complete() one by one")
        batch = []
        for rep in range(reps):
            rates, done = throughput(sides, prompts, seconds, rng)
            batch.append(rates)
            print(f"in-process rep {rep + 1}: 8 concurrent {rates['concurrent']:.1f}/s, "
                  f"in a row {rates['in_a_row']:.1f}/s ({done} each)", flush=True)  # fmt: skip

        if not args.no_rest:
            torch.set_num_threads(own_threads)  # gunicorn and the replica get the cores
            try:
                # The deployment's warm-up compares the evaluation's samples: evaluated on a
                # small golden set of test replies first (the evaluation task's body).
                golden = read_replies(SERVICE, "test")[:GOLDEN_REPLIES]
                print("evaluating ...", flush=True)
                started = time.perf_counter()
                bench.evaluate(version, bench.reply_version("golden", golden, kind="golden"))
                facts["evaluate_s"] = time.perf_counter() - started
                print(f"   {facts['evaluate_s']:.0f} s; deploying ...", flush=True)
                started = time.perf_counter()
                bench.deploy(version)
                facts["deploy_s"] = time.perf_counter() - started
                print(f"   warm in {facts['deploy_s']:.0f} s", flush=True)
                bench.start_web(workers=CONCURRENT)
                time.sleep(5)  # every worker's prewarm, not only the first's
                served = rest_sides(bench, "replies")
                group = prompts[:CONCURRENT]
                if served["in_a_row"](group) != sides["in_a_row"](group):
                    raise RuntimeError("the served completions differ from the in-process ones")
                throughput(served, prompts, 1.0, rng)  # warm-up
                for rep in range(reps):
                    rates, done = throughput(served, prompts, seconds, rng)
                    rest.append(rates)
                    print(
                        f"REST rep {rep + 1}: 8 concurrent {rates['concurrent']:.1f}/s, "
                        f"in a row {rates['in_a_row']:.1f}/s ({done} each)",
                        flush=True,
                    )
            except Exception as exc:  # reported in the entry: the in-process figures stand
                rest_note = f"not measured: {type(exc).__name__}: {str(exc)[:300]}"
                print(f"REST side failed: {rest_note}", flush=True)
        facts["threads"] = REPLICA_THREADS
    finally:
        bench.stop()
    facts.update(reps=reps, calls=calls, seconds=seconds, rest_note=rest_note,
                 total_min=(time.perf_counter() - started_all) / 60)  # fmt: skip
    met = report(latency, batch, rest, facts, args)
    print(f"whole run: {facts['total_min']:.1f} min")
    return 0 if met or args.quick else 1


def report(
    latency: list[dict[str, list[float]]],
    batch: list[dict[str, float]],
    rest: list[dict[str, float]],
    facts: dict[str, Any],
    args: argparse.Namespace,
) -> bool:
    pct = _serving.percentile
    long = facts["long_latency"]
    cache = [t for r in latency for t in r["cache"]]
    recompute = [t for r in latency for t in r["recompute"]]
    speedup = statistics.median(recompute) / statistics.median(cache)
    rep_speedups = [statistics.median(r["recompute"]) / statistics.median(r["cache"])
                    for r in latency]  # fmt: skip
    met = speedup >= TARGET_CACHE_SPEEDUP

    def concurrency_row(label: str, reps: list[dict[str, float]]) -> list[str]:
        ratios = [r["concurrent"] / r["in_a_row"] for r in reps]
        return [
            label,
            f"8 concurrent {_serving.med([r['concurrent'] for r in reps], '{:.1f}')} completions/s",
            f"8 in a row {_serving.med([r['in_a_row'] for r in reps], '{:.1f}')} completions/s",
            f"{statistics.median(ratios):.2f}x (reps {_serving.med(ratios)})",
            "— (recorded)",
            "—",
        ]

    rows = [
        [
            f"per-token latency p50, {MAX_TOKENS}-token greedy completion",
            f"key/value cache {statistics.median(cache):.2f} ms "
            f"(reps {_serving.med([statistics.median(r['cache']) for r in latency])})",
            f"recompute each step {statistics.median(recompute):.2f} ms "
            f"(reps {_serving.med([statistics.median(r['recompute']) for r in latency])})",
            f"{speedup:.2f}x faster (reps {_serving.med(rep_speedups)})",
            f"≥ {TARGET_CACHE_SPEEDUP:g}x",
            "yes" if met else "NO",
        ],
        [
            "per-token latency p99",
            f"{pct(cache, 99):.2f} ms",
            f"{pct(recompute, 99):.2f} ms",
            f"{pct(recompute, 99) / pct(cache, 99):.2f}x",
            "—",
            "—",
        ],
        [
            f"per-token latency p50, the longest fifth of the prompts (≥ {facts['long_tokens']} "
            f"prompt tokens; the median prompt {facts['prompt_tokens']:.0f})",
            f"{statistics.median(long['cache']):.2f} ms",
            f"{statistics.median(long['recompute']):.2f} ms",
            f"{statistics.median(long['recompute']) / statistics.median(long['cache']):.2f}x",
            "— (where the cache saves most)",
            "—",
        ],
        concurrency_row("8 completions in-process: complete_batch against complete() x 8", batch),
    ]
    if rest:
        rows.append(concurrency_row("8 completions through the REST complete endpoint", rest))
    else:
        rows.append(["8 completions through the REST complete endpoint", facts["rest_note"],
                     "—", "—", "—", "—"])  # fmt: skip
    if facts["model"] == "trained":
        val = {k: round(float(v), 3) for k, v in facts["val"].items()}
        p = facts["params"]
        model_note = (
            f"model: tiny-gpt2 trained by the workbench's runner on {SGD / SERVICE}/train.csv, "
            f"{p.get('epochs')} epochs (the catalogue's defaults otherwise), "
            f"{facts['train_s'] / 60:.1f} min; best validation {val}"
        )
    else:
        why = f" (training not available: {facts['why_random']})" if facts["why_random"] else ""
        model_note = (
            "model: the catalogue's tiny-gpt2 shape with RANDOM weights, tokenizer learnt on "
            f"{SGD / SERVICE}/train.csv{why}: timing only"
        )
    deployed = ""
    if "deploy_s" in facts:
        deployed = (
            f"evaluation on {GOLDEN_REPLIES} replies {facts['evaluate_s']:.0f} s, deployment "
            f"(Ray head + warm-up) {facts['deploy_s']:.0f} s"
        )
    rest_how = (
        "; REST: gunicorn with 8 sync workers, 8 keep-alive connections, a barrier before "
        "the 8 posts, served texts equal to in-process"
    )
    notes = [
        *_serving.machine_facts(),
        f"load average at start: {facts['load_start']}, at end: {load_avg()}; torch "
        f"intra-op threads on the in-process side {facts['threads']}, as in a replica",
        model_note,
        f"prompts: {facts['prompts']} of {facts['pool']} sampled {SERVICE} test prefixes "
        f"(word boundaries, with the customer's message as context) whose greedy completion "
        f"decodes at least {MAX_TOKENS} tokens (the healed typed word's included)",
        f"latency: {facts['reps']} reps x {facts['calls']} calls per side, interleaved call "
        f"by call (order alternating) after {WARMUP_CALLS} warm-up pairs; cached and "
        "recomputed texts equal on every call; ms per token = the call's wall time / tokens "
        "decoded (the prompt's forward pass included)",
        f"concurrency: groups of {CONCURRENT} random prompts, at least "
        f"{facts['seconds']:.0f} s per side and rep, interleaved group by group; batched "
        "and one-by-one results equal" + (rest_how if rest else ""),
        *([deployed] if deployed else []),
        f"whole run {facts['total_min']:.1f} min",
    ]
    _serving.finish(_serving.entry("autocomplete_decoding", _serving.table(rows), notes), args)
    return met


def main(argv: Sequence[str] | None = None) -> int:
    parser = _serving.parser(__doc__ or "", quick_help="1 rep x 30 calls, 2 s per side")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300, help="latency calls per side and rep")
    parser.add_argument(
        "--model", choices=("auto", "trained", "random"), default="auto",
        help="trained on banks_1 by the runner, or the catalogue's shape random (default: "
        "trained where the catalogue can train tiny-gpt2)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the brief training run")
    parser.add_argument("--no-rest", action="store_true", help="skip the deployed endpoint")
    args = parser.parse_args(argv)
    if not (SGD / SERVICE / "train.csv").is_file():
        parser.error(f"{SGD / SERVICE} has no train.csv (set SGD_REPLIES_DIR)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
