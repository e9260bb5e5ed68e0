"""Retrieval quality of a tuned embedding model: StackFAQ train -> test through the deployed
model's REST search endpoint, against the un-tuned base measured the same way in-process.

    .venv/bin/python benchmarks/retrieval_quality.py           # full: the defaults, both fields
    .venv/bin/python benchmarks/retrieval_quality.py --quick   # smoke: 1/8 of the pairs, 1 epoch
    .venv/bin/python benchmarks/retrieval_quality.py --document-fields text --only-tries \\
        --try '{"epochs": 2, "learning_rate": 1e-3, "max_length": 128}'  # another setting

On 2 shared cores a training run of the catalogue's defaults (2 epochs of 787 pairs at
max_length 128) took 2.4 min at load average ~2 and 10.5 min at 6-7; the former defaults (3
epochs at 256) 13.1 min at 1-3. Add ~1 min a variant for the deployment and the searches, and
the Ray head's start. ``--quick`` takes ~5 min.

What runs, on a fresh workbench (``benchmarks/_embedding.py``: SQLite, local artifact
store, a private local Ray head; StackFAQ read from ``../shared/datasets/stackfaq``):

* A, the project, per ``document_fields`` ("text": the answer's body alone, like for like
  with the issue's anchor, recall@1 0.720, and the row that decides the target;
  "title_text": the title then the body, the catalogue's default): the train pairs with the
  125 documents uploaded as a retrieval dataset version (datasets service); a training run
  of ``minilm-l6-embed`` with the catalogue's defaults (``apps.training.params``; only
  ``document_fields`` named) executed by the workbench's runner in this process
  (``runner.execute``: claim, heartbeats, metrics, checkpoints, the registered version);
  the version approved for production (the index built from its artifact, the replica warm
  on the real local Ray, the fleet controller's passes in-process); then every test query
  through ``POST /api/v1/tenants/{t}/models/{name}/search`` (k 10) on gunicorn (1 sync
  worker), and the rankings measured with ``worker.retrieval.metrics``.
* B, the reference: ``worker.embeddings.base_embedder`` (same max_length and
  document_fields), the test queries against the same documents in-process
  (``worker.retrieval.search``), the same metrics.
* ``--try JSON`` (repeatable): another training setting for document_fields text (run
  params over the defaults), measured as A and recorded as its own row.

Target: recall@1 (text) ≥ the base's + 0.10. Quality figures do not depend on the machine's
load; the wall times do. The full run prepends its table to ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _serving
from benchmarks._embedding import STACKFAQ, Bench, Doc, load_avg, read_documents, read_pairs

TARGET_GAIN = 0.10
K = 10
FIELDS = ("text", "title_text")
QUICK = {"epochs": 1, "max_length": 64}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def measure(rankings: Sequence[Sequence[str]], relevant: Sequence[set[str]]) -> dict[str, float]:
    from worker import retrieval

    return retrieval.metrics(rankings, relevant)


def base_metrics(
    fields: str, max_length: int, queries: list[str], relevant: list[set[str]], docs: list[Doc]
) -> dict[str, float]:
    from worker import retrieval
    from worker.embeddings import base_embedder

    base = base_embedder(max_length=max_length, document_fields=fields)
    ranked = retrieval.search(
        base.encode(queries, role="query"), base.encode_documents(docs), [d.id for d in docs], K
    )
    return measure([r.ids for r in ranked], relevant)


def fmt(m: dict[str, float]) -> str:
    return (
        f"{m['recall_at_1']:.3f} / {m['recall_at_5']:.3f} / {m['recall_at_10']:.3f} / "
        f"{m['mrr_at_10']:.3f} / {m['ndcg_at_10']:.3f}"
    )


def run(args: argparse.Namespace) -> int:
    documents = read_documents()
    train_pairs = read_pairs("train.csv")
    test_pairs = read_pairs("test.csv")
    if args.quick:
        train_pairs = train_pairs[::8]
        test_pairs = test_pairs[::8]
    by_query: dict[str, set[str]] = {}
    for query, document_id in test_pairs:
        by_query.setdefault(query, set()).add(document_id)
    queries, relevant = list(by_query), list(by_query.values())
    variants: list[tuple[str, str, dict[str, Any]]] = []  # (label, fields, given params)
    for fields in [] if args.only_tries else args.document_fields:
        given: dict[str, Any] = {"document_fields": fields, **(QUICK if args.quick else {})}
        variants.append((f"{fields}, defaults", fields, given))
    tries = []
    for raw in args.tries:
        extra = json.loads(raw)
        fields = extra.pop("document_fields", "text")
        given = {"document_fields": fields, **(QUICK if args.quick else {}), **extra}
        tries.append((f"{fields}, {json.dumps(extra, separators=(',', ':'))}", fields, given))
    # The deciding row first, then the tries, then the rest (a stopped run keeps the first).
    variants[1:1] = tries

    from worker import base_models

    default_length = int(base_models.get(base_models.MINILM_L6_EMBED).defaults()["max_length"])
    if args.quick:
        default_length = int(QUICK["max_length"])
    load_start = load_avg()
    bench = Bench()
    results: list[dict[str, Any]] = []
    stopped = ""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        bench.start()
        import torch

        version = bench.retrieval_version("stackfaq-train", train_pairs, documents)
        api = None
        for number, (label, fields, given) in enumerate(variants, start=1):
            name = f"stackfaq-{number}"
            print(f"A{number} ({label}): training ...", flush=True)
            # ray.init (at the first deployment) installs a SIGTERM handler that ends the
            # process at once: ours again, so a stop still reports the variants done.
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                model_version, train_s = bench.train(version, name, given)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report the variants done so far
                print(f"stopped during A{number}: reporting {len(results)} variant(s)")
                stopped = f"stopped during {label!r} ({number - 1} of {len(variants)} done)"
                break
            run_params = model_version.run.params
            print(f"   trained in {train_s / 60:.1f} min; deploying ...", flush=True)
            started = time.perf_counter()
            bench.deploy(model_version)
            deploy_s = time.perf_counter() - started
            if api is None:
                api = bench.start_web()
            path = f"/api/v1/tenants/{bench.tenant.slug}/models/{name}/search"
            rankings, latencies = [], []
            for query in queries:
                sent = time.perf_counter()
                status, body = api.post(path, {"query": query, "k": K})
                latencies.append((time.perf_counter() - sent) * 1000)
                if status != 200:
                    raise RuntimeError(f"search answered {status}: {body}")
                rankings.append([r["document_id"] for r in body["results"]])
            tuned = measure(rankings, relevant)
            print(f"   tuned (REST) r@1/5/10, MRR@10, nDCG@10: {fmt(tuned)}", flush=True)
            results.append(
                {
                    "label": label, "fields": fields, "tuned": tuned, "train_s": train_s,
                    "deploy_s": deploy_s, "search_p50": statistics.median(latencies),
                    "params": run_params, "val": model_version.run.metrics,
                }
            )  # fmt: skip
        bases: dict[tuple[str, int], dict[str, float]] = {}
        # The base of every document_fields, at each max_length a row trained at (or the
        # catalogue's), whether or not a tuned model of it ran: the reference beside it.
        lengths = sorted({int(r["params"]["max_length"]) for r in results} | {default_length})
        keys = [(f, n) for n in lengths for f in FIELDS]
        for result in results:
            result["key"] = (result["fields"], int(result["params"]["max_length"]))
        for key in keys:
            if key not in bases:
                print(f"B: the un-tuned base, document_fields {key[0]}, max_length {key[1]}")
                bases[key] = base_metrics(key[0], key[1], queries, relevant, documents)
                print(f"   base r@1/5/10, MRR@10, nDCG@10: {fmt(bases[key])}", flush=True)
        for result in results:
            result["base"] = bases[result["key"]]
        threads = torch.get_num_threads()
    finally:
        bench.stop()
    met_any = report(results, bases, args, queries=len(queries), train_rows=len(train_pairs),
                     load_start=load_start, threads=threads, stopped=stopped)  # fmt: skip
    return 0 if met_any or args.quick else 1


def report(
    results: list[dict[str, Any]],
    bases: dict[tuple[str, int], dict[str, float]],
    args: argparse.Namespace,
    *,
    queries: int,
    train_rows: int,
    load_start: str,
    threads: int,
    stopped: str = "",
) -> bool:
    rows = []
    decided = False
    for result in results:
        tuned, base = result["tuned"], result["base"]
        gain = tuned["recall_at_1"] - base["recall_at_1"]
        decides = result["fields"] == "text"
        met = gain >= TARGET_GAIN - 1e-9
        decided = decided or (decides and met)
        rows.append(
            [
                f"recall@1 / @5 / @10 / MRR@10 / nDCG@10, {result['label']}",
                fmt(tuned),
                f"un-tuned base {fmt(base)}",
                f"recall@1 {gain:+.3f}",
                f"≥ base + {TARGET_GAIN:.2f}" if decides else "— (base already 0.9+)",
                ("yes" if met else "NO") if decides else ("(yes)" if met else "(no)"),
            ]
        )
    for (fields, length), base in bases.items():
        rows.append(
            [
                f"recall@1 / @5 / @10 / MRR@10 / nDCG@10, the un-tuned base alone, "
                f"{fields}, max_length {length}",
                "—", fmt(base), "—", "—", "—",
            ]
        )  # fmt: skip
    body = _serving.table(rows)
    notes = [
        *_serving.machine_facts(),
        f"load average at start: {load_start}, at end: {load_avg()}; torch threads {threads}",
        f"data: {STACKFAQ} — {train_rows} train pairs (10 % of the queries held out for "
        f"validation by the run), {queries} test queries, 125 documents; search k {K}",
        "project: a retrieval dataset version (datasets service) -> a minilm-l6-embed run "
        "with the catalogue's defaults (apps.training.params; the row's params over them) "
        "executed by runner.execute in this process -> the registered version approved for "
        "production (index built from its artifact, warm on a local Ray) -> every test query "
        "through the REST search endpoint on gunicorn (1 sync worker); reference: "
        "worker.embeddings.base_embedder (same max_length and document_fields) in-process",
        "quality does not depend on the machine's load; the times below do",
        *([f"the run was {stopped}"] if stopped else []),
        *args.notes,
    ]
    for result in results:
        params = result["params"]
        shown = {k: params[k] for k in ("epochs", "learning_rate", "batch_size", "max_length",
                                        "warmup_ratio", "lora_r", "lora_alpha",
                                        "lora_target_modules", "document_fields")}  # fmt: skip
        val = {k: round(float(v), 3) for k, v in result["val"].items() if k.startswith("val_")}
        notes.append(
            f"{result['label']}: params {json.dumps(shown)}; best validation {json.dumps(val)}; "
            f"training run {result['train_s'] / 60:.1f} min, deployment (index + warm-up) "
            f"{result['deploy_s']:.0f} s, search p50 {result['search_p50']:.1f} ms (REST)"
        )
    _serving.finish(_serving.entry("retrieval_quality", body, notes), args)
    return decided


def main(argv: Sequence[str] | None = None) -> int:
    parser = _serving.parser(__doc__ or "", quick_help="1/8 of the pairs, 1 epoch, max_length 64")
    parser.add_argument(
        "--document-fields", nargs="+", choices=FIELDS, default=list(FIELDS),
        help="which document_fields to train with the defaults (default: both)",
    )  # fmt: skip
    parser.add_argument(
        "--try", dest="tries", action="append", default=[], metavar="JSON",
        help='another setting, run params over the defaults, e.g. \'{"epochs": 6}\'',
    )  # fmt: skip
    parser.add_argument(
        "--only-tries", action="store_true", help="train the --try settings only, no defaults"
    )
    parser.add_argument(
        "--note", dest="notes", action="append", default=[], help="a line for the entry"
    )
    args = parser.parse_args(argv)
    if not (STACKFAQ / "train.csv").is_file():
        parser.error(f"{STACKFAQ} has no train.csv (set STACKFAQ_DIR)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
