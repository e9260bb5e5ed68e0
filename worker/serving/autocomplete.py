"""Autocomplete models on a replica: a completer and the key/value caches of its sessions.

An autocomplete deployment answers one request (:mod:`worker.serving.fastpath`'s ``op``
``complete``): a reply's prefix (and the customer message it answers, ``context``) -> up
to ``n`` completions of at most ``max_tokens`` tokens, cut at the end of a sentence, by
:class:`worker.autocomplete.Completer` (the tokenizer and the stop rules travel in the
model's artifact). Two things are the replica's own:

* **sessions.** An agent types a reply a few characters at a time, and each call's prompt
  extends the previous one. A request naming a ``session`` decodes with that session's
  :class:`~worker.autocomplete.SessionState` (the previous call's prompt ids and their
  keys/values), so only the new tokens go through the model; ``cached_tokens`` in the
  answer says how many prompt tokens were reused. Sessions are held per model in an LRU
  bounded by count (``SESSIONS_PER_MODEL``) and by bytes (``SESSION_BYTES_PER_MODEL``): a
  session evicted is a cache miss next time, never a wrong answer. They go with the model
  when it is unloaded.
* **batching.** Concurrent greedy requests without a session are decoded together by
  :meth:`~worker.autocomplete.Completer.complete_batch` (one padded forward per step, each
  result equal to the prompt alone); the replica's ``serve.batch`` gathers them
  (:meth:`AutocompleteModel.complete_many`). A session's request decodes alone on its own
  cache (batching it would throw the cache away); beam and top-k alone too.

Light at import (no torch): the Completer comes from :mod:`worker.autocomplete` through
:mod:`worker.serving.loading`; this module only calls what :class:`CompleterLike` names.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker import autocomplete_text as limits

# Sessions an autocomplete model keeps (the least recently used goes first) ...
SESSIONS_PER_MODEL = 256
# ... and the most their caches may hold together; a model's memory accounting counts them.
SESSION_BYTES_PER_MODEL = 64 * 1024 * 1024
SESSION_ID_MAX_CHARS = 64
TOP_K_LIMIT = 50


class CompletionLike(Protocol):
    text: str
    score: float


class CompleterLike(Protocol):
    """What :class:`worker.autocomplete.Completer` offers the replica."""

    meta: dict[str, Any]

    def complete(
        self,
        prefix: str,
        context: str = "",
        *,
        max_tokens: int = ...,
        n: int = ...,
        strategy: str = ...,
        top_k: int = ...,
        seed: int = ...,
        use_cache: bool = ...,
        session: Any = ...,
    ) -> Sequence[CompletionLike]: ...

    def complete_batch(
        self, requests: Sequence[tuple[str, str]], *, max_tokens: int = ...
    ) -> Sequence[CompletionLike]: ...


@dataclass(frozen=True)
class CompletionRequest:
    """One ``complete`` call, checked (:func:`completion_request`)."""

    prefix: str
    context: str = ""
    max_tokens: int = limits.MAX_TOKENS_DEFAULT
    n: int = 1
    strategy: str = "greedy"
    top_k: int = 5
    seed: int = 0
    session: str = ""

    @property
    def batchable(self) -> bool:
        """Decoded with other requests by ``complete_batch``: greedy, one completion, no
        session cache to keep."""
        return self.strategy == "greedy" and self.n == 1 and not self.session

    def frame(self, model_id: str) -> dict[str, Any]:
        """The socket's ``complete`` frame for this request."""
        return {"op": "complete", "model_id": model_id, **self.__dict__}


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer between {low} and {high}")
    return value


def _str(value: Any, name: str, most: int) -> str:
    if not isinstance(value, str) or len(value) > most:
        raise ValueError(f"{name} must be a string of at most {most} characters")
    return value


def completion_request(message: dict[str, Any]) -> CompletionRequest:
    """A ``complete`` frame's fields, checked with :mod:`worker.autocomplete_text`'s
    limits (the REST API checks the same before it sends one); ValueError on any."""
    prefix = _str(message.get("prefix"), "prefix", limits.PREFIX_MAX_CHARS)
    if not prefix.strip():
        raise ValueError("prefix must not be empty")
    strategy = message.get("strategy", "greedy")
    if strategy not in limits.STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(limits.STRATEGIES)}")
    seed = message.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError("seed must be an integer")
    return CompletionRequest(
        prefix=prefix,
        context=_str(message.get("context", "") or "", "context", limits.CONTEXT_MAX_CHARS),
        max_tokens=_int(
            message.get("max_tokens", limits.MAX_TOKENS_DEFAULT),
            "max_tokens",
            1,
            limits.MAX_TOKENS_LIMIT,
        ),
        n=_int(message.get("n", 1), "n", 1, limits.N_LIMIT),
        strategy=str(strategy),
        top_k=_int(message.get("top_k", 5), "top_k", 1, TOP_K_LIMIT),
        seed=seed,
        session=_str(message.get("session", "") or "", "session", SESSION_ID_MAX_CHARS),
    )


def _answer(completions: Sequence[CompletionLike], cached_tokens: int) -> dict[str, Any]:
    return {
        "completions": [
            # tokens: what was generated (the per-token latency budget divides by it).
            {"text": c.text, "score": float(c.score), "tokens": int(getattr(c, "tokens", 0))}
            for c in completions
        ],
        "cached_tokens": int(cached_tokens),
    }


def state_bytes(state: Any) -> int:
    """What a session's cache holds: the bytes of every tensor in its ``cache`` (a
    transformers ``Cache``, or the legacy tuples), 0 before its first call."""
    seen = 0
    stack = [getattr(state, "cache", None)]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, str | bytes | int | float):
            continue
        numel = getattr(item, "numel", None)
        if callable(numel) and hasattr(item, "element_size"):
            seen += int(numel()) * int(item.element_size())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        else:  # a Cache object: its per-layer keys and values
            layers = getattr(item, "layers", None)
            if layers is not None:
                for layer in layers:
                    stack += [getattr(layer, "keys", None), getattr(layer, "values", None)]
            else:  # transformers before 4.54
                stack += [getattr(item, "key_cache", None), getattr(item, "value_cache", None)]
    return seen


class AutocompleteModel:
    """A served autocomplete model: its completer and its sessions' caches (LRU)."""

    def __init__(
        self,
        completer: CompleterLike,
        *,
        weight_bytes: int,
        session_factory: Any,
        max_sessions: int = SESSIONS_PER_MODEL,
        max_session_bytes: int = SESSION_BYTES_PER_MODEL,
    ) -> None:
        self.completer = completer
        self.model_bytes = weight_bytes
        # () -> a fresh SessionState (worker.autocomplete's; passed in so that this module
        # stays light).
        self._new_session = session_factory
        self.max_sessions = max_sessions
        self.max_session_bytes = max_session_bytes
        self.sessions: OrderedDict[str, Any] = OrderedDict()
        self._session_bytes: dict[str, int] = {}
        # The replica calls on its event loop, but a benchmark or a test may call from
        # threads: the LRU's bookkeeping is guarded (decoding is not: a session's calls
        # come one at a time, as the agent types).
        self._lock = threading.Lock()

    @property
    def weight_bytes(self) -> int:
        """The weights and what the sessions' caches hold now (the replica's accounting)."""
        return self.model_bytes + sum(self._session_bytes.values())

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.completer.meta)

    def _session(self, session_id: str) -> Any:
        with self._lock:
            state = self.sessions.pop(session_id, None)
            if state is None:
                state = self._new_session()
            self.sessions[session_id] = state  # most recently used last
            return state

    def _account(self, session_id: str, state: Any) -> None:
        """Record the session's cache size, then evict the least recently used sessions
        until the count and bytes are within bounds (never the one just used)."""
        with self._lock:
            if session_id in self.sessions:
                self._session_bytes[session_id] = state_bytes(state)
            while len(self.sessions) > 1 and (
                len(self.sessions) > self.max_sessions
                or sum(self._session_bytes.values()) > self.max_session_bytes
            ):
                oldest, _ = self.sessions.popitem(last=False)
                self._session_bytes.pop(oldest, None)

    def complete(self, request: CompletionRequest) -> dict[str, Any]:
        """One request alone: ``{"completions": [{"text", "score"}], "cached_tokens"}``."""
        if not request.session:
            found = self.completer.complete(
                request.prefix,
                request.context,
                max_tokens=request.max_tokens,
                n=request.n,
                strategy=request.strategy,
                top_k=request.top_k,
                seed=request.seed,
            )
            return _answer(found, 0)
        state = self._session(request.session)
        found = self.completer.complete(
            request.prefix,
            request.context,
            max_tokens=request.max_tokens,
            n=request.n,
            strategy=request.strategy,
            top_k=request.top_k,
            seed=request.seed,
            session=state,
        )
        self._account(request.session, state)
        return _answer(found, int(getattr(state, "last_cached_tokens", 0) or 0))

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[dict[str, Any]]:
        """Requests that arrived together: the batchable ones (greedy, no session) decoded
        together per ``max_tokens``, each of the others alone; answers in order."""
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for position, request in enumerate(requests):
            if request.batchable:
                groups.setdefault(request.max_tokens, []).append(position)
            else:
                answers[position] = self.complete(request)
        for max_tokens, positions in groups.items():
            if len(positions) == 1:
                answers[positions[0]] = self.complete(requests[positions[0]])
                continue
            prompts = [(requests[p].prefix, requests[p].context) for p in positions]
            found = self.completer.complete_batch(prompts, max_tokens=max_tokens)
            for p, completion in zip(positions, found, strict=True):
                answers[p] = _answer([completion], 0)
        return [a for a in answers if a is not None]
