"""Autocomplete quality per tenant: on each SGD service, a tiny-gpt2 trained on its train
replies by the workbench's runner and deployed, next-word top-1 accuracy of its test replies
through the REST complete endpoint, against the per-tenant word trigram measured the same way.

    .venv/bin/python benchmarks/autocomplete_quality.py                      # all 5 services
    .venv/bin/python benchmarks/autocomplete_quality.py --services banks_1   # one of them
    .venv/bin/python benchmarks/autocomplete_quality.py --quick              # smoke: 1 epoch
    .venv/bin/python benchmarks/autocomplete_quality.py --try '{"epochs": 12}'  # a setting

What runs per service (banks_1, hotels_2, rentalcars_1, restaurants_1, services_1, read in
place from ``../shared/datasets/sgd-replies``), on one fresh workbench
(``benchmarks/_embedding.py``'s ``Bench``: SQLite, local artifact store, a private local Ray
head, gunicorn with 1 sync worker):

* A, the project: ``train.csv`` uploaded as a text-generation dataset version (datasets
  service) and ``test.csv`` as a golden set; a ``tiny-gpt2`` run with the catalogue's
  defaults (``apps.training.params``; ``--try`` params over them) executed by the
  workbench's runner in this process (``runner.execute``: claim, heartbeats, metrics,
  checkpoints, early stop on val_loss, the registered version); the version evaluated on the
  golden set by the evaluation task's body (its samples are what the warm-up compares);
  approved for production (the replica warm on the real local Ray, the fleet controller's
  passes in-process); then every test reply typed to each word boundary after its first
  word — the prefix up to word i, trailing spaces dropped, the customer's message as
  context, as the evaluation counts them (``autocomplete_eval.boundary_prefixes``) —
  through ``POST /api/v1/tenants/{t}/models/{name}/complete`` (greedy): the next word is
  the evaluation's ``predicted_next_word`` of the completion (its first word, by
  ``autocomplete_text``; none where it carries on the typed word), right when it equals
  word i (punctuation marks are words).
* B, the reference: ``worker.trigram.Trigram`` fitted on the same train replies, each of
  the same positions through its ``complete`` in-process, the same next word.

Greedy decoding is deterministic and decodes token by token, so the first word of a
completion of ``SHORT_TOKENS`` tokens is that of a 16-token completion whenever something
follows it in the text; only where nothing does (the word may go on) is the position asked
again with 16 tokens. The first positions of each service are also asked with 16 tokens at
once, and must agree (checked, counted in the entry).

Target: next-word top-1 at least 5 points above the trigram's on every service. With
``--in-process`` (or where the deployment or the endpoint fails) A is measured through the
version's artifact loaded as a ``Completer`` in this process instead, and the entry says
so: the target is through the deployed model. Quality does not depend on the machine's load;
the times do: per service a training run of a few minutes, ~1 min for the evaluation and the
deployment, and 1,700-4,000 completions through REST (~2-5 min); the whole run 20-40 min on
2 shared cores. The full run prepends its table to ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _serving
from benchmarks._autocomplete import (
    REPLICA_THREADS,
    SERVICES,
    SGD,
    AutocompleteBench,
    Position,
    positions,
    read_replies,
)
from benchmarks._embedding import load_avg

TARGET_POINTS = 5.0
MAX_TOKENS = 16
SHORT_TOKENS = 4
CHECKED_POSITIONS = 50
QUICK = {"epochs": 1}

# (prefix, context, max_tokens) -> the first completion's text
Complete = Callable[[str, str, int], str]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _decided(prefix: str, text: str) -> tuple[bool, str | None]:
    """(whether a longer greedy completion could predict another next word than ``text``
    does, the next word ``text`` predicts): decided when ``text`` carries on the typed word
    (its first character says so) or its first word is followed by what ends it."""
    from worker.autocomplete_eval import predicted_next_word
    from worker.autocomplete_text import word_spans

    spans = word_spans(text)
    if not spans:
        return False, None  # nothing but spaces yet (or the end): ask with 16 tokens
    predicted = predicted_next_word(prefix, text)
    if predicted is None:
        return True, None  # carries on the typed word: the first character decided it
    start, end = spans[0]
    if end - start == 1 and not text[start].isalnum():
        return True, predicted  # a punctuation mark: a word of one character, whole
    # A word is a maximal run of letters and digits (an inner apostrophe kept): anything
    # else after it ends it.
    return end < len(text) and text[end] != "'", predicted


def next_word(complete: Complete, p: Position) -> tuple[str | None, int]:
    """The next word the greedy completion of ``p`` predicts
    (``autocomplete_eval.predicted_next_word``) and the calls it took."""
    from worker.autocomplete_eval import predicted_next_word

    decided, word = _decided(p.prefix, complete(p.prefix, p.context, SHORT_TOKENS))
    if decided:
        return word, 1
    return predicted_next_word(p.prefix, complete(p.prefix, p.context, MAX_TOKENS)), 2


def measure(complete: Complete, where: Sequence[Position]) -> dict[str, Any]:
    """Next-word top-1 over ``where``; the first CHECKED_POSITIONS also asked with 16 tokens
    at once, which must give the same word."""
    from worker.autocomplete_eval import predicted_next_word

    right = calls = 0
    latencies: list[float] = []
    for i, p in enumerate(where):
        started = time.perf_counter()
        word, n = next_word(complete, p)
        latencies.append((time.perf_counter() - started) * 1000 / n)
        calls += n
        right += word == p.word
        if i < CHECKED_POSITIONS:
            direct = predicted_next_word(p.prefix, complete(p.prefix, p.context, MAX_TOKENS))
            calls += 1
            if direct != word:
                raise RuntimeError(
                    f"the {SHORT_TOKENS}-token shortcut gave {word!r}, 16 tokens {direct!r} "
                    f"for {p.prefix!r}"
                )
    return {
        "top1": right / len(where),
        "right": right,
        "positions": len(where),
        "calls": calls,
        "p50_ms": statistics.median(latencies),
    }


def rest_complete(bench: AutocompleteBench, api: Any, name: str) -> Complete:
    path = f"/api/v1/tenants/{bench.tenant.slug}/models/{name}/complete"

    def complete(prefix: str, context: str, max_tokens: int) -> str:
        body = {"prefix": prefix, "context": context, "max_tokens": max_tokens}
        status, answer = api.post(path, body)
        if status != 200:
            raise RuntimeError(f"complete answered {status}: {answer}")
        completions = answer["completions"]
        return str(completions[0]["text"]) if completions else ""

    return complete


def object_complete(model: Any) -> Complete:
    """A Completer's or the trigram's ``complete``, greedy."""

    def complete(prefix: str, context: str, max_tokens: int) -> str:
        out = model.complete(prefix, context, max_tokens=max_tokens)
        return str(out[0].text) if out else ""

    return complete


def run(args: argparse.Namespace) -> int:
    import torch

    from worker.trigram import Trigram

    variants: list[tuple[str, dict[str, Any]]] = [("defaults", {})] if not args.only_tries else []
    for raw in args.tries:
        variants.append((json.dumps(json.loads(raw), separators=(",", ":")), json.loads(raw)))
    load_start = load_avg()
    started_all = time.perf_counter()
    bench = AutocompleteBench()
    results: list[dict[str, Any]] = []
    stopped = ""
    api = None
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        bench.start()
        own_threads = torch.get_num_threads()
        for service in args.services:
            train = read_replies(service, "train")
            test = read_replies(service, "test")
            if args.quick:
                test = test[::8]
            where = list(positions(test))
            print(f"{service}: {len(train)} train replies, {len(test)} test replies, "
                  f"{len(where)} positions", flush=True)  # fmt: skip
            started = time.perf_counter()
            trigram = Trigram.fit(train)
            trigram_m = measure(object_complete(trigram), where)
            trigram_m["fit_and_measure_s"] = time.perf_counter() - started
            print(f"   trigram top-1 {trigram_m['top1']:.3f}", flush=True)
            data = bench.reply_version(f"{service}-train", train)
            golden = bench.reply_version(f"{service}-golden", test, kind="golden")
            for label, extra in variants:
                name = f"{service}-{len(results) + 1}"
                given = {**(QUICK if args.quick else {}), **extra}
                print(f"   A ({label}): training ...", flush=True)
                # ray.init (at the first deployment) installs a SIGTERM handler that ends
                # the process at once: ours again, so a stop reports what is done.
                signal.signal(signal.SIGTERM, _interrupt)
                try:
                    version, train_s = bench.train_autocomplete(data, name, given)
                except KeyboardInterrupt:
                    stopped = f"stopped while training {name} ({len(results)} rows done)"
                    raise
                print(f"   trained in {train_s / 60:.1f} min; evaluating ...", flush=True)
                result: dict[str, Any] = {
                    "service": service, "label": label, "trigram": trigram_m,
                    "train_s": train_s, "params": version.run.params,
                    "val": version.run.metrics or {}, "replies": (len(train), len(test)),
                }  # fmt: skip
                evaluation = bench.evaluate(version, golden)
                result["evaluation"] = (evaluation.metrics, evaluation.base_metrics)
                how = "in-process" if args.in_process else "REST"
                complete: Complete | None = None
                if not args.in_process:
                    try:
                        started = time.perf_counter()
                        torch.set_num_threads(own_threads)
                        bench.deploy(version)
                        result["deploy_s"] = time.perf_counter() - started
                        api = api or bench.start_web()
                        complete = rest_complete(bench, api, name)
                        complete("Hello", "", 1)  # the endpoint answers, or we fall back
                    except Exception as exc:  # the entry says why it fell back
                        how = f"in-process (REST failed: {type(exc).__name__}: {str(exc)[:200]})"
                        print(f"   {how}", flush=True)
                        complete = None
                if complete is None:
                    torch.set_num_threads(REPLICA_THREADS)
                    complete = object_complete(bench.completer(version))
                print(f"   measuring {len(where)} positions ({how}) ...", flush=True)
                result["project"] = measure(complete, where)
                result["how"] = how
                print(f"   project top-1 {result['project']['top1']:.3f} ({how}) against "
                      f"the trigram's {trigram_m['top1']:.3f}", flush=True)  # fmt: skip
                results.append(result)
    except KeyboardInterrupt:
        stopped = stopped or f"stopped ({len(results)} rows done)"
        print(stopped, flush=True)
    finally:
        bench.stop()
    if not results:
        print("nothing measured")
        return 1
    met = report(results, args, load_start=load_start, stopped=stopped,
                 total_min=(time.perf_counter() - started_all) / 60)  # fmt: skip
    return 0 if met or args.quick else 1


def report(
    results: list[dict[str, Any]],
    args: argparse.Namespace,
    *,
    load_start: str,
    stopped: str,
    total_min: float,
) -> bool:
    rows = []
    all_met = True
    for r in results:
        a, b = r["project"], r["trigram"]
        gain = (a["top1"] - b["top1"]) * 100
        through_rest = r["how"] == "REST"
        met = gain >= TARGET_POINTS - 1e-9
        all_met = all_met and met and through_rest
        label = "" if r["label"] == "defaults" else f", {r['label']}"
        rows.append(
            [
                f"next-word top-1, {r['service']}{label} ({a['positions']:,} positions of "
                f"{r['replies'][1]} test replies)",
                f"{a['top1']:.3f} ({r['how'] if through_rest else 'IN-PROCESS, not REST'})",
                f"trigram {b['top1']:.3f}",
                f"{gain:+.1f} points",
                f"≥ +{TARGET_POINTS:g} points",
                ("yes" if met else "NO") if through_rest else ("(yes)" if met else "(no)"),
            ]
        )
    for r in results:
        m, base = r["evaluation"]
        label = "" if r["label"] == "defaults" else f", {r['label']}"

        def fig(d: dict[str, Any], key: str) -> str:
            v = d.get(key)
            return "—" if v is None else f"{float(v):.3f}"

        rows.append(
            [
                f"the evaluation's own figures, {r['service']}{label}: next_word_top1 / "
                f"top3 / exact_match / keystrokes_saved ({m.get('positions', '?')} positions)",
                " / ".join(fig(m, k) for k in ("next_word_top1", "next_word_top3",
                                               "exact_match", "keystrokes_saved")),
                "trigram " + " / ".join(fig(base, k) for k in (
                    "next_word_top1", "next_word_top3", "exact_match", "keystrokes_saved")),
                "—", "—", "—",
            ]
        )  # fmt: skip
    notes = [
        *_serving.machine_facts(),
        f"load average at start: {load_start}, at end: {load_avg()}",
        f"data: {SGD}; per service train.csv -> the run (10 % held out for validation by "
        "the run), test.csv -> the golden set and the positions: every word boundary after "
        "a reply's first word, the prefix up to it (trailing spaces dropped) with the "
        "customer's message as context (autocomplete_eval.boundary_prefixes), right when "
        "autocomplete_eval.predicted_next_word of the greedy completion (its first word; "
        "none where it carries on the typed word) equals the next word (punctuation marks "
        "are words)",
        "project: a text-generation dataset version -> a tiny-gpt2 run with the catalogue's "
        "defaults (the row's params over them) by runner.execute in this process -> "
        "evaluated on the golden set (evaluation task body) -> approved for production "
        "(warm on a local Ray) -> each position through the REST complete endpoint "
        "(gunicorn, 1 sync worker); reference: worker.trigram.Trigram fitted on the same "
        "train replies, the same positions in-process",
        f"each position asked with {SHORT_TOKENS} tokens, again with {MAX_TOKENS} where "
        f"nothing followed the first word; the first {CHECKED_POSITIONS} per service also "
        f"with {MAX_TOKENS} at once: the same word on every one",
        "the evaluation's own figures: apps.evaluation on the golden set (its capped sample "
        "of replies), the trigram as its base_metrics",
        "quality does not depend on the machine's load; the times below do",
        *([f"the run was {stopped}"] if stopped else []),
        *args.notes,
    ]
    for r in results:
        p = r["params"]
        shown = {k: p.get(k) for k in ("epochs", "learning_rate", "batch_size", "max_length",
                                       "patience", "init_from")}  # fmt: skip
        val = {k: round(float(v), 3) for k, v in r["val"].items()
               if k.startswith("val_") and isinstance(v, int | float)}  # fmt: skip
        deploy = f", deployment {r['deploy_s']:.0f} s" if "deploy_s" in r else ""
        notes.append(
            f"{r['service']} ({r['label']}): {r['replies'][0]} train replies; params "
            f"{json.dumps(shown)}; best validation {json.dumps(val)}; training run "
            f"{r['train_s'] / 60:.1f} min{deploy}; {r['project']['calls']} completions "
            f"({r['how'].split(' ')[0]}), p50 {r['project']['p50_ms']:.1f} ms a call; "
            f"trigram {r['trigram']['calls']} completions"
        )
    notes.append(f"whole run {total_min:.1f} min")
    _serving.finish(_serving.entry("autocomplete_quality", _serving.table(rows), notes), args)
    return all_met


def main(argv: Sequence[str] | None = None) -> int:
    parser = _serving.parser(__doc__ or "", quick_help="1 epoch, 1/8 of the test replies")
    parser.add_argument(
        "--services", nargs="+", choices=SERVICES, default=list(SERVICES),
        help="which SGD services (default: all five)",
    )  # fmt: skip
    parser.add_argument(
        "--try", dest="tries", action="append", default=[], metavar="JSON",
        help='another setting, run params over the defaults, e.g. \'{"epochs": 12}\'',
    )  # fmt: skip
    parser.add_argument(
        "--only-tries", action="store_true", help="train the --try settings only, no defaults"
    )
    parser.add_argument(
        "--in-process", action="store_true",
        help="measure the trained model in this process, not through the deployed endpoint",
    )  # fmt: skip
    parser.add_argument(
        "--note", dest="notes", action="append", default=[], help="a line for the entry"
    )
    args = parser.parse_args(argv)
    if not (SGD / args.services[0] / "train.csv").is_file():
        parser.error(f"{SGD} has no {args.services[0]}/train.csv (set SGD_REPLIES_DIR)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
