"""Serving an embedding model: search latency over a 10,000-document index through the REST
API against a brute-force numpy search in-process on the same vectors, and embed throughput
through the REST API against the bare encoder.

    .venv/bin/python benchmarks/embedding_serving.py           # full: 3 reps, 10,000 documents
    .venv/bin/python benchmarks/embedding_serving.py --quick   # smoke: 1,000 documents, 1 rep

The quick run took 5.3 min on 2 shared cores (load average 4-7; the 1,000-document index
and the Ray head's start 3.5 min of it); the full run's 10,000-document index is ~10x that
index's encode, so expect 10-25 min by the load, most of it the index build.

What runs, on a fresh workbench (``benchmarks/_embedding.py``: SQLite, local artifact store,
a private local Ray head, gunicorn with 1 sync worker):

* the model: the catalogue's ``minilm-l6-embed`` shape as a run registers it (LoRA r 16,
  alpha 32 on query, key, value and attention.output.dense of all 6 layers, small random
  factors so the vectors are not the base's; max_length 256; document_fields title_text;
  one encoder), registered as an embedding model version;
* the knowledge base: 10,000 synthetic documents made from StackFAQ's 125 (read in place
  from ``../shared/datasets/stackfaq``, never copied): document i takes the title and first
  sentence (at most 160 characters) of StackFAQ document i mod 125, then 8 words drawn at
  random (seeded) from another StackFAQ document, titled "<title> (#i)"; the StackFAQ test
  queries are its pairs, each pointing at its original's first copy. Uploaded as a retrieval
  dataset version, then the version approved for production: the index is built from the
  version's artifact (in-process, as the index task would), the replica warm on the local
  Ray, the routes published;
* the brute-force reference in this process: the same model directory loaded with
  ``worker.embeddings.load_embedder`` and the index's own vectors (read back from the
  artifact store), a query as ``encode([query], role="query")`` then
  ``worker.retrieval.top_k(..., k 10)``.

Per repetition, interleaved call by call (A B A B ...) after 30 untimed warm-up calls of
each, keep-alive HTTP:

1. search: A ``POST /api/v1/tenants/{t}/models/{name}/search`` ``{"query": q, "k": 10}``,
   B the brute force; StackFAQ train and test queries drawn at random (seeded), the same
   for both; the ids must agree. p50/p99 per side, the ratio A/B of the p50s (target
   ≤ 1.5x).
2. embed: A ``POST .../embed`` ``{"inputs": 32 StackFAQ documents (title_text, as the
   index embeds them), "role": "document"}``, B ``Embedder.encode(same 32,
   role="document", batch_size=32)``; texts/s over at least 10 s of calls per side and rep,
   the ratio A/B (target ≥ 90 %).

The load average at start and end goes into the entry; the full run prepends its table to
``benchmarks/README.md``, ``--quick`` records only with ``--record``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _serving
from benchmarks._embedding import STACKFAQ, Bench, Doc, load_avg, read_documents, read_pairs

TARGET_LATENCY_RATIO = 1.5
TARGET_THROUGHPUT = 0.90
K = 10
WARMUP_CALLS = 30
EMBED_BATCH = 32
# torch intra-op threads of a replica (Ray: OMP_NUM_THREADS=1 for fractional-CPU actors).
REPLICA_THREADS = 1
LORA_MODULES = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense")  # fmt: skip


def synthetic_documents(count: int, originals: list[Doc], seed: int = 0) -> list[Doc]:
    rng = random.Random(seed)
    words = [d.text.split() for d in originals]
    docs = []
    for i in range(count):
        a = originals[i % len(originals)]
        first = a.text.split(". ")[0][:160]
        other = words[rng.randrange(len(originals))]
        extra = " ".join(rng.choice(other) for _ in range(8))
        docs.append(Doc(id=f"syn{i:05d}", title=f"{a.title} (#{i})", text=f"{first} {extra}"))
    return docs


def catalogue_shaped_embedder(directory: Path) -> Any:
    """minilm-l6-embed's default LoRA shape with small random factors, packed."""
    import torch

    from apps.training.packaging import pack_dir
    from tests.worker.serving.embedding_models import PackedEmbedder
    from worker import base_models
    from worker.embeddings import write_embedder_dir

    base = base_models.MINILM_L6_EMBED
    defaults = base_models.get(base).defaults()
    rank, alpha = int(defaults["lora_r"]), float(defaults["lora_alpha"])
    generator = torch.Generator().manual_seed(7)
    modules = [f"encoder.layer.{layer}.{m}" for layer in range(6) for m in LORA_MODULES]
    factors = {}
    for module in modules:
        factors[f"{module}.lora_A"] = torch.randn(rank, 384, generator=generator) * 0.02
        factors[f"{module}.lora_B"] = torch.randn(384, rank, generator=generator) * 0.02
    meta = {
        "kind": "embedding", "format": "adapter", "base_model": base,
        "base": base_models.get(base).base, "base_sha256": base_models.base_sha256(base),
        "lora": {"r": rank, "alpha": alpha, "dropout": 0.0, "target_modules": modules},
        "max_length": int(defaults["max_length"]), "pooling": "mean", "separate": False,
        "dim": 384, "document_fields": str(defaults["document_fields"]),
    }  # fmt: skip
    model_dir = directory / "model"
    write_embedder_dir(model_dir, meta=meta, query=factors, document=None)
    tar = directory / "model.tar"
    sha256, size = pack_dir(model_dir, tar)
    return PackedEmbedder(model_dir=model_dir, tar=tar, sha256=sha256, size=size)


def interleave(
    sides: Mapping[str, Callable[[Any], Any]], items: Sequence[Any]
) -> dict[str, list[float]]:
    """Each item through each side in turn; milliseconds per call per side."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for item in items:
        for name, fn in sides.items():
            started = time.perf_counter()
            fn(item)
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def run(args: argparse.Namespace) -> int:
    reps = 1 if args.quick else args.reps
    calls = 30 if args.quick else args.calls
    embed_seconds = 2.0 if args.quick else 10.0
    count = 1000 if args.quick else args.documents
    originals = read_documents()
    queries = sorted({q for q, _ in read_pairs("train.csv") + read_pairs("test.csv")})
    documents = synthetic_documents(count, originals)
    first_copy = {d.id: f"syn{i:05d}" for i, d in enumerate(originals)}
    pairs = [(q, first_copy[d]) for q, d in read_pairs("test.csv")]

    load_start = load_avg()
    started_all = time.perf_counter()
    bench = Bench()
    try:
        bench.start()
        import torch

        own_threads = torch.get_num_threads()

        from apps.core.artifacts import get_store
        from tests.embedding_helpers import register_embedding
        from worker import retrieval
        from worker.embeddings import load_embedder
        from worker.serving.embedding import read_index

        packed = catalogue_shaped_embedder(Path(tempfile.mkdtemp(dir=bench.var)))
        data = bench.retrieval_version("kb-10k", pairs, documents)
        version = register_embedding(bench.tenant, "faq", packed, data,
                                     trainer=bench.scientist.user)  # fmt: skip
        print(f"deploying: indexing {count} documents ...", flush=True)
        started = time.perf_counter()
        deployment = bench.deploy(version)
        deploy_s = time.perf_counter() - started
        print(f"   warm in {deploy_s:.0f} s", flush=True)
        with get_store().open(deployment.index_key) as stored:
            index = read_index(stored.read(), deployment.index_sha256)
        vectors = index.vectors
        bare = load_embedder(packed.model_dir)
        # The in-process side runs as a replica does: Ray starts its fractional-CPU actors
        # with OMP_NUM_THREADS=1, so a replica's torch has one intra-op thread. (At this
        # process's two threads the bare encoder is ~2x faster on 2 cores: a comparison of
        # thread counts, not of the serving path.)
        torch.set_num_threads(REPLICA_THREADS)
        api = bench.start_web()
        base = f"/api/v1/tenants/{bench.tenant.slug}/models/faq"

        def rest_search(query: str) -> list[str]:
            status, body = api.post(f"{base}/search", {"query": query, "k": K})
            if status != 200:
                raise RuntimeError(f"search answered {status}: {body}")
            return [r["document_id"] for r in body["results"]]

        def brute_force(query: str) -> list[str]:
            ranked, _ = retrieval.top_k(bare.encode([query], role="query"), vectors, K)
            return [index.ids[int(i)] for i in ranked[0]]

        rng = random.Random(1)
        for query in rng.sample(queries, WARMUP_CALLS):  # untimed; the two must agree
            if rest_search(query) != brute_force(query):
                raise RuntimeError(f"REST and brute force disagree on {query!r}")
        search_reps = []
        for rep in range(reps):
            items = [rng.choice(queries) for _ in range(calls)]
            times = interleave({"rest": rest_search, "numpy": brute_force}, items)
            search_reps.append(times)
            print(f"search rep {rep + 1}: REST p50 {statistics.median(times['rest']):.2f} ms, "
                  f"numpy p50 {statistics.median(times['numpy']):.2f} ms", flush=True)  # fmt: skip

        texts = [bare.document_text(d) for d in originals]
        texts = [t[:2000] for t in texts]  # PREDICT_MAX_INPUT_CHARS

        def rest_embed(batch: list[str]) -> None:
            status, body = api.post(f"{base}/embed", {"inputs": batch, "role": "document"})
            if status != 200 or len(body["embeddings"]) != len(batch):
                raise RuntimeError(f"embed answered {status}: {str(body)[:300]}")

        def bare_embed(batch: list[str]) -> None:
            bare.encode(batch, role="document", batch_size=EMBED_BATCH)

        embed_sides = {"rest": rest_embed, "bare": bare_embed}
        first = rng.sample(texts, EMBED_BATCH)
        _, reply = api.post(f"{base}/embed", {"inputs": first, "role": "document"})
        vectors_served = np.asarray(reply["embeddings"], dtype=np.float32)
        cosine = float(np.min(np.sum(vectors_served * bare.encode(first, role="document"), axis=1)))
        interleave(embed_sides, [rng.sample(texts, EMBED_BATCH) for _ in range(2)])  # warm-up
        embed_reps = []
        for rep in range(reps):
            spent = {name: 0.0 for name in embed_sides}
            done = 0
            while min(spent.values()) < embed_seconds * 1000:
                times = interleave(embed_sides, [rng.sample(texts, EMBED_BATCH)])
                for name in embed_sides:
                    spent[name] += times[name][0]
                done += EMBED_BATCH
            rates = {name: done / (ms / 1000) for name, ms in spent.items()}
            embed_reps.append(rates)
            print(f"embed rep {rep + 1}: REST {rates['rest']:.1f} texts/s, bare "
                  f"{rates['bare']:.1f} texts/s over {done} texts", flush=True)  # fmt: skip
        threads = torch.get_num_threads()
        torch.set_num_threads(own_threads)
    finally:
        bench.stop()
    total_min = (time.perf_counter() - started_all) / 60
    facts = {
        "count": count, "calls": calls, "reps": reps, "deploy_s": deploy_s, "cosine": cosine,
        "load_start": load_start, "threads": threads, "total_min": total_min,
        "embed_seconds": embed_seconds,
    }  # fmt: skip
    met = report(search_reps, embed_reps, facts, args)
    print(f"whole run: {total_min:.1f} min")
    return 0 if met or args.quick else 1


def report(
    search_reps: list[dict[str, list[float]]],
    embed_reps: list[dict[str, float]],
    facts: dict[str, Any],
    args: argparse.Namespace,
) -> bool:
    pct = _serving.percentile
    rest = [t for r in search_reps for t in r["rest"]]
    numpy = [t for r in search_reps for t in r["numpy"]]
    p50_ratio = statistics.median(rest) / statistics.median(numpy)
    rep_ratios = [statistics.median(r["rest"]) / statistics.median(r["numpy"]) for r in search_reps]
    p99_ratio = pct(rest, 99) / pct(numpy, 99)
    rest_rates = [r["rest"] for r in embed_reps]
    bare_rates = [r["bare"] for r in embed_reps]
    share = [r["rest"] / r["bare"] for r in embed_reps]
    latency_met = p50_ratio <= TARGET_LATENCY_RATIO
    throughput_met = statistics.median(share) >= TARGET_THROUGHPUT
    body = _serving.table(
        [
            [
                f"search p50, {facts['count']:,} documents, k {K}",
                f"REST {statistics.median(rest):.2f} ms "
                f"(reps {_serving.med([statistics.median(r['rest']) for r in search_reps])})",
                f"numpy in-process {statistics.median(numpy):.2f} ms "
                f"(reps {_serving.med([statistics.median(r['numpy']) for r in search_reps])})",
                f"{p50_ratio:.2f}x (reps {_serving.med(rep_ratios)})",
                f"≤ {TARGET_LATENCY_RATIO:g}x",
                "yes" if latency_met else "NO",
            ],
            [
                "search p99",
                f"{pct(rest, 99):.2f} ms",
                f"{pct(numpy, 99):.2f} ms",
                f"{p99_ratio:.2f}x",
                "—",
                "—",
            ],
            [
                f"embed throughput, {EMBED_BATCH} documents a call (role document)",
                f"REST {_serving.med(rest_rates, '{:.1f}')} texts/s",
                f"bare Embedder.encode {_serving.med(bare_rates, '{:.1f}')} texts/s",
                f"{statistics.median(share) * 100:.1f} % "
                f"(reps {_serving.med([s * 100 for s in share], '{:.1f}')})",
                f"≥ {TARGET_THROUGHPUT * 100:.0f} %",
                "yes" if throughput_met else "NO",
            ],
        ]
    )
    notes = [
        *_serving.machine_facts(),
        f"load average at start: {facts['load_start']}, at end: {load_avg()}; torch intra-op "
        f"threads on the in-process side {facts['threads']}, as in a replica (Ray starts "
        "fractional-CPU actors with OMP_NUM_THREADS=1)",
        f"{facts['reps']} reps x {facts['calls']} search calls per side, interleaved call by "
        f"call after {WARMUP_CALLS} warm-up calls (REST and numpy ids equal on each); embed: "
        f"per rep at least {facts['embed_seconds']:.0f} s of calls per side, interleaved; "
        f"served and bare document vectors at cosine >= {facts['cosine']:.6f}",
        f"model: minilm-l6-embed's default shape (LoRA r 16 on q/k/v/attention.output.dense "
        f"x 6 layers, random factors; max_length 256; title_text); index: {facts['count']:,} "
        f"synthetic documents from {STACKFAQ} (title + first sentence of document i mod 125, "
        "8 random words of another), built by the deployment in "
        f"{facts['deploy_s']:.0f} s; gunicorn 1 sync worker; CPU",
        f"whole run {facts['total_min']:.1f} min",
    ]
    _serving.finish(_serving.entry("embedding_serving", body, notes), args)
    return latency_met and throughput_met


def main(argv: Sequence[str] | None = None) -> int:
    parser = _serving.parser(__doc__ or "", quick_help="1,000 documents, 1 rep x 30 calls")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300, help="search calls per side and rep")
    parser.add_argument("--documents", type=int, default=10_000)
    args = parser.parse_args(argv)
    if not (STACKFAQ / "documents.csv").is_file():
        parser.error(f"{STACKFAQ} has no documents.csv (set STACKFAQ_DIR)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
