"""The Ray Serve deployment behind every replica set and tail tier of a serving pool.

One class, two roles, told apart by the ``user_config`` the driver pushes
(:class:`worker.serving.routing.ReplicaConfig`):

- **set** (pinned models): :meth:`ModelReplica.reconfigure` loads every model of the config
  that is not loaded yet and unloads the ones that left it, in the running replica (Serve
  calls ``reconfigure`` on a config change without restarting the replica, and on every
  replica start, so a restarted replica reloads its models by itself).
- **tail** (deployed but unpinned models): models load on first use and stay while the
  tier's policy (:class:`worker.serving.cache.FrequencyCache`) keeps them within the
  budget. ``@serve.multiplexed`` registers the models a tail replica holds, so Serve routes
  a model's requests to a replica that already has it; the eviction decisions are ours
  (Serve's multiplexing alone is a plain LRU by count). New unpinned models are loaded once
  on reconfigure to verify them (sha256, files), then left to the policy. The tail is also
  the pool application's ingress and holds its routing table (:meth:`routes`).

Concurrent requests are batched (``@serve.batch``; the pool's ``max_batch_size`` and
``batch_wait_timeout_s``): one forward pass per model in a batch. CUDA when present.

An embedding pool's replicas hold embedding models
(:class:`~worker.serving.embedding.EmbeddingModel`: an embedder on the shared base, and the
indexes its entry names: the served one and, during a reindex, a staged one) and answer
``embed`` and ``search`` (the socket's ``op`` frames, or Serve's handle); concurrent embeds
and searches of a model share one encoder pass per role.

An autocomplete pool's replicas hold autocomplete models
(:class:`~worker.serving.autocomplete.AutocompleteModel`: a small causal LM with its
tokenizer and stop rules, and an LRU of its sessions' key/value caches) and answer
``complete``; concurrent greedy completions of a model without a session are decoded
together (:meth:`~worker.serving.autocomplete.AutocompleteModel.complete_many`).

Each replica publishes its statistics (see :meth:`ModelReplica.stats`) in Ray's GCS
key-value store every second and after every reconfigure; the driver reads them there.
They include the address and secret of the replica's own request socket
(:mod:`worker.serving.fastpath`), which drivers use instead of a Ray actor call; the
requests it serves are reported to Serve's autoscaler by :meth:`record_autoscaling_stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from worker import adapters
from worker.serving import ray_private
from worker.serving.autocomplete import AutocompleteModel, CompletionRequest, completion_request
from worker.serving.autoscaling import FAST_ONGOING
from worker.serving.cache import FrequencyCache
from worker.serving.embedding import (
    EmbeddingModel,
    check_k,
    check_role,
    read_index,
    search_index,
)
from worker.serving.fastpath import FastServer
from worker.serving.loading import Served, default_device, fetch_bytes, load_model
from worker.serving.routing import (
    STATS_PUSH_INTERVAL_S,
    ModelEntry,
    ModelNotHere,
    ReplicaConfig,
    Route,
    stats_key,
)
from worker.serving.specs import ModelLoadError, Output

logger = logging.getLogger(__name__)

# Latency percentiles are over each model's last this many requests.
LATENCY_WINDOW = 1024
# Upper bound of requests a replica works on at once (queued in its batcher).
MAX_ONGOING_REQUESTS = 64


@dataclass
class ModelState:
    """One model on one replica: its spec, the loaded classifier, its counters."""

    entry: ModelEntry
    classifier: Served | None = None
    memory_bytes: int = 0  # of the loaded weights
    load_ms: float | None = None
    error: str | None = None
    # An embedding model's staged index that failed to load (its served index failing is
    # the model's ``error``).
    index_error: str | None = None
    hits: int = 0
    misses: int = 0
    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def report(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        report: dict[str, Any] = {
            "model_id": self.entry["model_id"],
            "sha256": self.entry["sha256"],
            "pinned": self.entry["pinned"],
            # An adapter on a shared base (its sha256), or a full model ("").
            "format": "adapter" if self.entry.get("base_sha256") else "full",
            "base_sha256": self.entry.get("base_sha256", ""),
            "loaded": self.classifier is not None,
            "memory_bytes": self.memory_bytes,
            "load_ms": None if self.load_ms is None else round(self.load_ms, 3),
            "hits": self.hits,
            "misses": self.misses,
            "requests": self.requests,
            "errors": self.errors,
            "latency_ms_p50": _percentile(ordered, 0.50),
            "latency_ms_p99": _percentile(ordered, 0.99),
            "error": self.error,
        }
        model = self.classifier
        if isinstance(model, EmbeddingModel):
            report.update(index=model.current, indexes=sorted(model.indexes))
        if isinstance(model, AutocompleteModel):
            report["sessions"] = len(model.sessions)
        if self.entry.get("index_sha256") or isinstance(model, EmbeddingModel):
            report.setdefault("index", "")
            report.setdefault("indexes", [])
            report["index_error"] = self.index_error
        return report


def _indexes_of(entry: ModelEntry) -> tuple[str, str]:
    return entry.get("index_sha256", ""), entry.get("staged_index_sha256", "")


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _rss_bytes() -> int:
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
class ModelReplica:
    """A replica of a set or of a pool's tail (see the module docstring)."""

    def __init__(self, kind: str, role: str, *_sets: Any) -> None:
        # ``_sets``: the tail (the ingress) is bound to the set deployments only so that
        # Serve deploys them as one application; it never calls them.
        ray_private.check_version()  # fail at start, not deep in a request
        context = serve.get_replica_context()
        self.app = context.app_name
        self.deployment = context.deployment
        self.replica_id = context.replica_id.unique_id
        self.kind = kind
        self.role = role
        self.started_at = time.time()
        self.device = default_device()
        self.models: dict[str, ModelState] = {}
        self.current: ReplicaConfig | None = None
        self.applied_version = ""
        self.cache: FrequencyCache | None = None
        self._pusher: asyncio.Task[None] | None = None
        self.fast = FastServer(
            self.predict,
            replica_id=self.replica_id,
            ops={
                "embed": self._embed_frame,
                "search": self._search_frame,
                "complete": self._complete_frame,
            },
        )

    # --- configuration ---------------------------------------------------------------

    async def reconfigure(self, config: ReplicaConfig) -> None:
        self.current = config
        for batcher in (self._batched, self._encode_batched, self._complete_batched):
            # serve.batch's setters are not in its type
            any_batcher: Any = batcher
            any_batcher.set_max_batch_size(max(1, int(config["max_batch_size"])))
            any_batcher.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))
        wanted = {entry["model_id"]: entry for entry in config["models"]}
        for model_id, state in list(self.models.items()):
            kept = wanted.get(model_id)
            if kept is None or kept["sha256"] != state.entry["sha256"]:
                self._unload(model_id)
                del self.models[model_id]
                if self.cache is not None:
                    self.cache.remove(model_id)
            elif _indexes_of(kept) != _indexes_of(state.entry):
                # A reindex (staged, or made the served one): the model stays loaded.
                state.entry = kept
                if isinstance(state.classifier, EmbeddingModel):
                    self._sync_indexes(state, state.classifier)
                    state.memory_bytes = state.classifier.weight_bytes
        new = [model_id for model_id in wanted if model_id not in self.models]
        for model_id in new:
            self.models[model_id] = ModelState(entry=wanted[model_id])
        if self.role == "tail":
            self._resize_cache(int(config["budget_bytes"]))
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_forever())
            await self._start_fast()
        for model_id in new:
            state = self.models[model_id]
            async with state.lock:
                # A request may have loaded it meanwhile (sets), or verified it (tail).
                if state.classifier is None and (self.role == "set" or state.load_ms is None):
                    classifier = self._load(state)
                    if classifier is not None and self.role == "set":
                        self._hold(state, classifier)
            await asyncio.sleep(0)  # let requests for loaded models through
        self.applied_version = config["version"]
        self._push_stats()

    def _resize_cache(self, budget: int) -> None:
        if self.cache is not None and self.cache.budget == budget:
            return
        held = [m for m, s in self.models.items() if s.classifier is not None]
        self.cache = FrequencyCache(budget)
        for model_id in held:
            entry = self.models[model_id].entry
            kept, evicted = self.cache.admit(
                model_id,
                entry["memory_bytes"],
                entry.get("base_sha256", ""),
                entry.get("base_memory_bytes", 0),
            )
            for victim in [*evicted, *([] if kept else [model_id])]:
                self._unload(victim)

    def _load(self, state: ModelState) -> Served | None:
        """Fetch, verify and build; the error is recorded (and the model left out) rather
        than failing the whole replica: one bad artifact must not take down a set."""
        entry = state.entry
        try:
            loaded = load_model(entry["artifact_uri"], entry["sha256"], device=self.device)
        except ModelLoadError as error:
            state.error = str(error)
            logger.warning("model %s failed to load: %s", entry["model_id"], error)
            return None
        if isinstance(loaded.classifier, EmbeddingModel):
            self._sync_indexes(state, loaded.classifier)
            if state.error is not None:
                return None
        state.error = None
        state.load_ms = loaded.load_ms
        return loaded.classifier

    def _sync_indexes(self, state: ModelState, model: EmbeddingModel) -> None:
        """Hold exactly the indexes the entry names (the served one and a staged one),
        each read once and checked by sha256; the served one becomes ``current``. The
        served index failing fails the model (``error``); a staged one, ``index_error``."""
        entry = state.entry
        served = entry.get("index_sha256", "")
        wanted = {
            sha: uri
            for sha, uri in (
                (served, entry.get("index_uri", "")),
                (entry.get("staged_index_sha256", ""), entry.get("staged_index_uri", "")),
            )
            if sha
        }
        state.index_error = None
        for sha, uri in wanted.items():
            if sha in model.indexes:
                continue
            try:
                model.indexes[sha] = read_index(fetch_bytes(uri), sha)
            except ModelLoadError as error:
                logger.warning("index %s of %s failed to load: %s", sha, entry["model_id"], error)
                if sha == served:
                    state.error = f"index: {error}"
                else:
                    state.index_error = str(error)
        for sha in list(model.indexes):
            if sha not in wanted:
                del model.indexes[sha]
        model.current = served if served in model.indexes else ""

    @staticmethod
    def _hold(state: ModelState, classifier: Served) -> None:
        state.classifier = classifier
        state.memory_bytes = classifier.weight_bytes

    def _unload(self, model_id: str) -> None:
        state = self.models.get(model_id)
        if state is not None:
            state.classifier = None
            state.memory_bytes = 0
        if self.role == "tail":
            self._forget_routing(model_id)

    async def _start_fast(self) -> None:
        """Listen on the node's address (other nodes' drivers connect to it); a replica
        that cannot is still served through Ray."""
        import ray

        try:
            await self.fast.start(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        except OSError:
            logger.exception("the replica's request socket could not start")

    # --- requests --------------------------------------------------------------------

    async def predict(self, model_id: str, texts: list[str]) -> dict[str, Any]:
        started = time.perf_counter()
        state = self.models.get(model_id)
        if state is None:
            raise ModelNotHere(f"model {model_id} is not on {self.app}/{self.deployment}")
        try:
            if self.role == "tail":
                await self._register_routing(model_id)
            classifier = await self._classifier(state)
            if isinstance(classifier, EmbeddingModel):
                raise ValueError("an embedding model answers embed and search, not predict")
            if isinstance(classifier, AutocompleteModel):
                raise ValueError("an autocomplete model answers complete, not predict")
            outputs = await self._batched((classifier, texts))
        except BaseException:
            state.errors += 1
            raise
        state.requests += 1
        state.latencies_ms.append((time.perf_counter() - started) * 1000)
        return {"outputs": outputs, "replica_id": self.replica_id}

    async def embed(self, model_id: str, texts: list[str], role: str) -> dict[str, Any]:
        """Embeddings of ``texts`` by the query or the document encoder (float32 values)."""

        check_role(role)

        async def run(model: EmbeddingModel) -> dict[str, Any]:
            vectors = await self._encode_batched((model, texts, role))
            # The float32 array itself: the socket's frame writes it at float32's shortest
            # repr (half the bytes of its values as Python floats), Serve's handle pickles it.
            return {"embeddings": vectors, "dim": model.dim}

        return await self._embedding_call(model_id, run)

    async def search(self, model_id: str, query: str, k: int, index: str = "") -> dict[str, Any]:
        """The ``k`` best documents for ``query`` in the model's index (or the staged one
        named by ``index``, which the warm-up verifies before it serves)."""

        check_k(k)

        async def run(model: EmbeddingModel) -> dict[str, Any]:
            chosen = model.index(index)
            vectors = await self._encode_batched((model, [query], "query"))
            return {"results": search_index(chosen, vectors, k)[0], "index": chosen.sha256}

        return await self._embedding_call(model_id, run)

    async def _embed_frame(self, message: dict[str, Any]) -> dict[str, Any]:
        texts = message.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("expected texts (list of str)")
        return await self.embed(message["model_id"], texts, str(message.get("role", "query")))

    async def _search_frame(self, message: dict[str, Any]) -> dict[str, Any]:
        query, k = message.get("query"), message.get("k", 5)
        if not isinstance(query, str) or not isinstance(k, int) or isinstance(k, bool):
            raise ValueError("expected query (str), k (int)")
        return await self.search(message["model_id"], query, k, str(message.get("index") or ""))

    async def complete(self, model_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """Completions of a reply's prefix by an autocomplete model (``request``: the
        ``complete`` frame's fields, see :func:`~worker.serving.autocomplete.completion_request`):
        ``{"completions": [{"text", "score"}], "cached_tokens", "replica_id"}``."""
        checked = completion_request(request)

        async def run(model: AutocompleteModel) -> dict[str, Any]:
            if not checked.batchable:
                # A session decodes on its own cache; beam and top-k alone as well.
                return model.complete(checked)
            answer: dict[str, Any] = await self._complete_batched((model, checked))
            return answer

        return await self._model_call(model_id, AutocompleteModel, run)

    async def _complete_frame(self, message: dict[str, Any]) -> dict[str, Any]:
        return await self.complete(message["model_id"], message)

    async def _embedding_call(self, model_id: str, run: Any) -> dict[str, Any]:
        return await self._model_call(model_id, EmbeddingModel, run)

    async def _model_call(self, model_id: str, kind: type, run: Any) -> dict[str, Any]:
        """``run`` on the model (loaded first where it is not), counted in its statistics;
        a ValueError (a bad request) when it is not a model of ``kind``."""
        started = time.perf_counter()
        state = self.models.get(model_id)
        if state is None:
            raise ModelNotHere(f"model {model_id} is not on {self.app}/{self.deployment}")
        try:
            if self.role == "tail":
                await self._register_routing(model_id)
            model = await self._classifier(state)
            if not isinstance(model, kind):
                what = "an embedding" if kind is EmbeddingModel else "an autocomplete"
                raise ValueError(f"model {model_id} is not {what} model")
            reply: dict[str, Any] = await run(model)
        except BaseException:
            state.errors += 1
            raise
        state.requests += 1
        state.latencies_ms.append((time.perf_counter() - started) * 1000)
        if isinstance(model, AutocompleteModel) and state.classifier is model:
            state.memory_bytes = model.weight_bytes  # its sessions' caches grew or went
        reply["replica_id"] = self.replica_id
        return reply

    async def _classifier(self, state: ModelState) -> Served:
        model_id = state.entry["model_id"]
        cached = self.cache.lookup(model_id) if self.cache is not None else True
        if state.classifier is not None and cached:
            state.hits += 1
            return state.classifier
        state.misses += 1
        async with state.lock:
            if state.classifier is not None:  # loaded while this request waited
                return state.classifier
            classifier = self._load(state)
            if classifier is None:
                raise ModelLoadError(state.error or f"model {model_id} could not be loaded")
            if self.cache is None:
                self._hold(state, classifier)
                return classifier
            kept, evicted = self.cache.admit(
                model_id,
                state.entry["memory_bytes"],
                state.entry.get("base_sha256", ""),
                state.entry.get("base_memory_bytes", 0),
            )
            for victim in evicted:
                self._unload(victim)
            if kept:
                self._hold(state, classifier)
            return classifier  # not kept: serves this request, then goes

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _encode_batched(
        self, items: list[tuple[EmbeddingModel, list[str], str]]
    ) -> list[np.ndarray]:
        """One encoder pass per model and role: concurrent embeds and searches of a model
        share it (as classifier requests share a forward pass)."""
        groups: dict[tuple[int, str], list[int]] = {}
        for position, (model, _, role) in enumerate(items):
            groups.setdefault((id(model), role), []).append(position)
        results: list[np.ndarray] = [np.zeros((0, 0), dtype=np.float32) for _ in items]
        for (_, role), positions in groups.items():
            model = items[positions[0]][0]
            vectors = model.embed([t for p in positions for t in items[p][1]], role)
            start = 0
            for p in positions:
                count = len(items[p][1])
                results[p] = vectors[start : start + count]
                start += count
        return results

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _complete_batched(
        self, items: list[tuple[AutocompleteModel, CompletionRequest]]
    ) -> list[dict[str, Any]]:
        """Greedy completions that arrived together: one padded decoding per model (and
        ``max_tokens``), each answer equal to the request's alone."""
        groups: dict[int, list[int]] = {}
        for position, (model, _) in enumerate(items):
            groups.setdefault(id(model), []).append(position)
        results: list[dict[str, Any]] = [{} for _ in items]
        for positions in groups.values():
            model = items[positions[0]][0]
            answers = model.complete_many([items[p][1] for p in positions])
            for p, answer in zip(positions, answers, strict=True):
                results[p] = answer
        return results

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[tuple[Served, list[str]]]) -> list[list[Output]]:
        """One forward pass per model: the requests for the same model share it; the
        requests for adapters share one pass of their base, whatever their tenants."""
        groups: dict[int, list[int]] = {}
        on_bases: list[int] = []
        for position, (classifier, _) in enumerate(items):
            if isinstance(classifier, adapters.AdapterModel):
                on_bases.append(position)
            else:
                groups.setdefault(id(classifier), []).append(position)
        results: list[list[Output]] = [[] for _ in items]
        if on_bases:
            mixed = adapters.predict_mixed(
                [(items[p][0], items[p][1]) for p in on_bases]  # type: ignore[misc]
            )
            for p, outputs in zip(on_bases, mixed, strict=True):
                results[p] = outputs
        for positions in groups.values():
            classifier = items[positions[0]][0]
            texts = [text for p in positions for text in items[p][1]]
            outputs = classifier.predict(texts)  # type: ignore[union-attr]
            start = 0
            for p in positions:
                count = len(items[p][1])
                results[p] = outputs[start : start + count]
                start += count
        return results

    # --- routing (tail) --------------------------------------------------------------

    @serve.multiplexed(max_num_models_per_replica=-1)
    async def _routing_token(self, model_id: str) -> str:
        # Registers ``model_id`` with Serve's model-aware routing; holds nothing else.
        return model_id

    async def _register_routing(self, model_id: str) -> None:
        await self._routing_token(model_id)

    def _forget_routing(self, model_id: str) -> None:
        # Tell Serve's router this replica no longer holds the model (its multiplexing
        # wrapper only forgets models by its own LRU, which never triggers at -1).
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is not None and wrapper.models.pop(model_id, None) is not None:
            wrapper._push_multiplexed_replica_info = True

    def config(self) -> ReplicaConfig | None:
        """The configuration this replica was last given."""
        return self.current

    def routes(self) -> dict[str, Route]:
        """The pool's routing table: model id -> the deployment serving it (tail only)."""
        return dict(self.current["routes"]) if self.current is not None else {}

    # --- statistics ------------------------------------------------------------------

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook for custom autoscaling metrics: the socket's ongoing requests,
        which Serve does not count (see :mod:`worker.serving.autoscaling`)."""
        return {FAST_ONGOING: float(self.fast.ongoing)}

    def stats(self) -> dict[str, Any]:
        """This replica's state: its models and their counters (JSON-able)."""
        reports = [state.report() for _, state in sorted(self.models.items())]
        bases = self._bases()
        if self.role == "tail":
            # Only what the tier holds or failed on: the rest is deployed but cold.
            reports = [
                r
                for r in reports
                if r["loaded"] or r["requests"] or r["error"] or r["load_ms"] is not None
            ]
        return {
            "replica_id": self.replica_id,
            "app": self.app,
            "deployment": self.deployment,
            "role": self.role,
            "index": self.current["index"] if self.current else -1,
            "version": self.applied_version,
            "started_at": self.started_at,
            "device": self.device,
            "rss_bytes": _rss_bytes(),
            "memory_used_bytes": sum(state.memory_bytes for state in self.models.values())
            + sum(base["memory_bytes"] for base in bases),
            "bases": bases,
            "models": reports,
            "fast": self.fast.published(),
            "socket_requests": self.fast.requests,
            "updated_at": time.time(),
        }

    def _bases(self) -> list[dict[str, Any]]:
        """The shared bases this replica holds for its loaded adapters, each held once."""
        held: dict[str, tuple[adapters.SharedBase, int]] = {}
        for state in self.models.values():
            model = state.classifier
            shared = model.base if isinstance(model, adapters.AdapterModel) else None
            if isinstance(model, EmbeddingModel):
                shared = getattr(model.embedder, "base", None)
            if isinstance(shared, adapters.SharedBase):
                base, count = held.get(shared.sha256, (shared, 0))
                held[base.sha256] = (base, count + 1)
        return [
            {
                "base_model": base.base_model,
                "sha256": sha256,
                "memory_bytes": base.weight_bytes,
                "adapters": count,
            }
            for sha256, (base, count) in sorted(held.items())
        ]

    def _push_stats(self) -> None:
        key = stats_key(self.app, self.deployment, self.replica_id)
        try:
            ray_private.kv_put(key, json.dumps(self.stats()))
        except Exception:  # the GCS briefly away: the next push will do
            logger.exception("could not publish replica statistics")

    async def _push_forever(self) -> None:
        while True:
            await asyncio.sleep(STATS_PUSH_INTERVAL_S)
            self._push_stats()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.fast.close()
        with contextlib.suppress(Exception):
            ray_private.kv_del(stats_key(self.app, self.deployment, self.replica_id))
