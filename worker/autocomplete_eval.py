"""Evaluating an autocomplete model on a golden reply corpus: what the agent is spared.

What the ``autocomplete`` promotion gates read, and the one definition of each figure:
training's validation (``val_next_word_top1``), the evaluation of a version and of the
per-tenant trigram beside it (:mod:`worker.trigram`, measured by the same code), a
deployment's warm-up (the ``samples``) and the benchmarks all count the same way. The model
is anything with the :class:`worker.autocomplete.Completer` methods used here (``complete``,
optionally ``complete_batch``, ``next_words``, ``token_log_likelihood``). No torch here: the
model brings its own.

Words, prefixes and sentence ends are :mod:`worker.autocomplete_text`'s. A reply is measured
stripped of surrounding whitespace; its customer message (``context``) goes with every
request made for it.

- **replies**: those of at least two words (a one-word reply has no prefix to complete);
  at most ``max_replies`` of them, a ``seed``-ed random sample kept in file order, then as
  many of those, in order, as fit in ``max_positions`` (whole replies; at least one).
- **positions**: every word boundary of a measured reply after its first word: the prefix
  before word ``i`` (``i >= 1``) is ``text[:span_i.start].rstrip()``, the reply as typed up
  to the end of word ``i - 1`` (a prefix ending mid-word, as the model's token healing
  reads it: the model decides whether the word is finished). Empty prefixes are not asked:
  the REST endpoint refuses them.
- **next word** of a completion: :func:`predicted_next_word` — the completion's first word,
  none when the completion carries on the typed word (``"Just"`` → ``"ice"``: the model
  thought the word unfinished, so it predicted no next word).
- **next_word_top1**: the share of positions whose greedy completion's next word is the
  reply's word ``i``. **next_word_top3**: whose word ``i`` is among the greedy word followed
  by ``next_words(k=3)``, three distinct words at most (asked only where the greedy word
  missed: a top-1 hit is a top-3 hit, and next_words costs several decodes).
- **exact_match**: each measured reply of at least two words is cut after its first half of
  words (``max(1, n // 2)`` words: the held-out prefix, a position above); the **reference**
  is the rest of the reply up to and including its first sentence end (all of it without
  one). A reply matches when the greedy completion of its held-out prefix, cut at its first
  sentence end, has the reference's words (:func:`completion_matches`). The completion is
  a default request's: ``max_tokens`` (16) tokens at most, so a longer rest cannot match.
- **keystrokes_saved** (Smart Compose's measure, :func:`keystrokes`): the agent types the
  reply character by character, its first word in full; at each word boundary after it the
  greedy completion of the text typed so far is shown. When the suggestion's words are the
  reply's next words (at least one; the whole suggestion, it is taken whole or not at all)
  the agent accepts it with one keystroke and the cursor moves past those words; otherwise
  the agent types on to the end of the next word, the spaces before it included. saved =
  1 - keystrokes / characters, both summed over the measured replies (a reply's characters:
  its stripped length). Accepting ``"ing?"`` in ``"Anything else?"`` after ``"Anyth"`` never
  happens: suggestions are asked at word boundaries only.
- **perplexity**: ``exp(sum NLL / tokens)`` of the measured replies (reply tokens and the end
  token, given the context) by ``token_log_likelihood``; None for a model without it (the
  trigram has no comparable token perplexity).
- **latency per token**: wall time of one ``complete`` call (greedy, ``max_tokens``, one
  prompt: what a request pays) divided by the tokens it generated (at least 1), on
  ``latency_prefixes`` positions spread evenly over all, after one untimed warm-up call;
  p50/p95 linear between order statistics (numpy's default). The accuracy passes use
  ``complete_batch`` where the model has it (each result equal to ``complete``'s).
- **samples**: the first ``samples`` held-out prefixes with their context, greedy completion,
  reference and whether it matched, and the ``max_tokens`` asked: what the review page shows
  and what a deployment's warm-up sends through the fleet and must get back unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from worker.autocomplete_text import (
    MAX_TOKENS_DEFAULT,
    cut_at_sentence_end,
    first_word,
    word_spans,
    words,
)

MAX_REPLIES = 200
MAX_POSITIONS = 2000
SAMPLES = 16
LATENCY_PREFIXES = 32
BATCH_SIZE = 32
TOP_K = 3


class CompletionLike(Protocol):
    @property
    def text(self) -> str: ...
    @property
    def tokens(self) -> int: ...


class CompleterLike(Protocol):
    """What is measured: :class:`worker.autocomplete.Completer`, or the trigram."""

    def complete(
        self, prefix: str, context: str = "", *, max_tokens: int = MAX_TOKENS_DEFAULT
    ) -> Sequence[CompletionLike]: ...

    def next_words(self, prefix: str, context: str = "", *, k: int = 3) -> list[str]: ...


class ReplyLike(Protocol):
    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class Position:
    """A word boundary of a measured reply and what the model made of it."""

    reply: int  # index into the measured replies
    word: int  # the reply's word the prefix ends before (>= 1)
    prefix: str
    expected: str
    predicted: str | None
    # The greedy word, then (where it missed) next_words', distinct, at most TOP_K.
    top: tuple[str, ...]

    @property
    def hit(self) -> bool:
        return self.predicted == self.expected

    @property
    def hit_top(self) -> bool:
        return self.expected in self.top


@dataclass
class AutocompleteResult:
    """One autocomplete model evaluated on one reply corpus (definitions: module docstring)."""

    metrics: dict[str, float | int | None]
    samples: list[dict[str, Any]]
    positions: list[Position] = field(repr=False)
    replies: int
    replies_in_set: int
    characters: int
    keystrokes: int
    held_out: int  # replies measured for exact match
    max_tokens: int
    device: str

    def summary(self) -> dict[str, Any]:
        """The numbers an evaluation stores and gates read (no customer text)."""
        return {
            "task": "text-generation",
            **self.metrics,
            "replies_in_set": self.replies_in_set,
            "characters": self.characters,
            "keystrokes": self.keystrokes,
            "held_out": self.held_out,
            "max_tokens": self.max_tokens,
            "device": self.device,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the definitions, one function each --------------------------------------------------


def boundary_prefixes(text: str) -> list[tuple[str, str]]:
    """(prefix, next word) at each word boundary of ``text`` after its first word."""
    text = text.strip()
    spans, found = word_spans(text), words(text)
    return [(text[: spans[i][0]].rstrip(), found[i]) for i in range(1, len(found))]


def predicted_next_word(prefix: str, completion: str) -> str | None:
    """The next word a completion of ``prefix`` predicts: its first word, or None when it
    carries on the prefix's last word (the model did not finish that word)."""
    if prefix[-1:].isalnum() and completion[:1].isalnum():
        return None
    return first_word(completion)


def held_out(text: str) -> tuple[str, str] | None:
    """(prefix, reference) of a reply for exact match: its first half of words, and the
    rest up to its first sentence end; None for a reply of fewer than two words."""
    text = text.strip()
    spans = word_spans(text)
    if len(spans) < 2:
        return None
    cut = max(1, len(spans) // 2)
    return text[: spans[cut][0]].rstrip(), cut_at_sentence_end(text[spans[cut - 1][1] :])


def completion_matches(completion: str, reference: str) -> bool:
    """Whether a completion, cut at its first sentence end, has the reference's words."""
    return words(cut_at_sentence_end(completion)) == words(reference)


def keystrokes(text: str, suggest: Callable[[str], str]) -> tuple[int, int]:
    """(keystrokes, characters) typing ``text`` with ``suggest(prefix)``'s completions
    offered at each word boundary after the first word (see the module's docstring)."""
    text = text.strip()
    spans, found = word_spans(text), words(text)
    if not spans:
        return len(text), len(text)
    typed = spans[0][1]  # the first word, in full
    position, index = spans[0][1], 1
    while index < len(spans):
        prefix = text[:position]
        suggestion = suggest(prefix)
        offered = words(suggestion)
        if (
            offered
            and predicted_next_word(prefix, suggestion) is not None
            and offered == found[index : index + len(offered)]
        ):
            typed += 1
            index += len(offered)
            position = spans[index - 1][1]
        else:
            typed += spans[index][1] - position
            position = spans[index][1]
            index += 1
    return typed + len(text) - position, len(text)


def sample_replies(
    replies: Sequence[ReplyLike], *, max_replies: int, max_positions: int, seed: int
) -> list[int]:
    """Indices of the replies measured (see the module's docstring), in file order."""
    eligible = [i for i, r in enumerate(replies) if len(words(r.text)) >= 2]
    if len(eligible) > max_replies:
        eligible = sorted(random.Random(seed).sample(eligible, max_replies))
    chosen: list[int] = []
    total = 0
    for index in eligible:
        count = len(words(replies[index].text)) - 1
        if chosen and total + count > max_positions:
            break
        chosen.append(index)
        total += count
    return chosen


def next_word_top1(
    model: CompleterLike,
    replies: Sequence[ReplyLike],
    *,
    max_replies: int = MAX_REPLIES,
    max_positions: int = MAX_POSITIONS,
    seed: int = 0,
    max_tokens: int = MAX_TOKENS_DEFAULT,
    batch_size: int = BATCH_SIZE,
) -> float:
    """next_word_top1 alone (training's ``val_next_word_top1``): greedy completions only."""
    measured = [replies[i] for i in sample_replies(
        replies, max_replies=max_replies, max_positions=max_positions, seed=seed)]  # fmt: skip
    if not measured:
        raise ValueError("nothing to evaluate: no reply of two words or more")
    requests = [
        (prefix, _context(reply), expected)
        for reply in measured
        for prefix, expected in boundary_prefixes(reply.text)
    ]
    texts = complete_all(model, [(p, c) for p, c, _ in requests], max_tokens, batch_size)
    hits = sum(predicted_next_word(p, texts[(p, c)]) == e for p, c, e in requests)
    return hits / len(requests)


def complete_all(
    model: CompleterLike, requests: Iterable[tuple[str, str]], max_tokens: int, batch_size: int
) -> dict[tuple[str, str], str]:
    """The greedy completion text of each distinct (prefix, context), through
    ``complete_batch`` where the model has it."""
    distinct = list(dict.fromkeys(requests))
    batch = getattr(model, "complete_batch", None)
    texts: dict[tuple[str, str], str] = {}
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        if callable(batch):
            results = batch(chunk, max_tokens=max_tokens)
        else:
            results = [model.complete(p, c, max_tokens=max_tokens)[0] for p, c in chunk]
        if len(results) != len(chunk):
            raise ValueError(f"the model returned {len(results)} completions for {len(chunk)}")
        texts.update((request, r.text) for request, r in zip(chunk, results, strict=True))
    return texts


# --- the evaluation ------------------------------------------------------------------------


def evaluate_autocomplete(
    model: CompleterLike,
    replies: Sequence[ReplyLike],
    *,
    max_replies: int = MAX_REPLIES,
    max_positions: int = MAX_POSITIONS,
    seed: int = 0,
    max_tokens: int = MAX_TOKENS_DEFAULT,
    samples: int = SAMPLES,
    latency_prefixes: int = LATENCY_PREFIXES,
    batch_size: int = BATCH_SIZE,
) -> AutocompleteResult:
    """Measure ``model`` on the golden ``replies`` (objects with ``text`` and, optionally,
    ``context``)."""
    if max_replies < 1 or max_positions < 1 or max_tokens < 1 or batch_size < 1:
        raise ValueError("max_replies, max_positions, max_tokens and batch_size must be >= 1")
    chosen = sample_replies(
        replies, max_replies=max_replies, max_positions=max_positions, seed=seed
    )
    if not chosen:
        raise ValueError("nothing to evaluate: no reply of two words or more")
    measured = [(replies[i].text.strip(), _context(replies[i])) for i in chosen]
    boundaries = [boundary_prefixes(text) for text, _ in measured]
    requests = [
        (prefix, context)
        for (_, context), found in zip(measured, boundaries, strict=True)
        for prefix, _ in found
    ]
    texts = complete_all(model, requests, max_tokens, batch_size)

    positions: list[Position] = []
    for reply, ((_, context), found) in enumerate(zip(measured, boundaries, strict=True)):
        for word, (prefix, expected) in enumerate(found, start=1):
            predicted = predicted_next_word(prefix, texts[(prefix, context)])
            # A right greedy word is a top-3 hit whatever else is offered: next_words (the
            # costly part, several decodes) is asked only where the greedy word missed.
            alternatives = (
                []
                if predicted == expected
                else [w.lower() for w in model.next_words(prefix, context, k=TOP_K)]
            )
            top = [w for w in dict.fromkeys([predicted, *alternatives]) if w is not None]
            positions.append(Position(reply, word, prefix, expected, predicted, tuple(top[:TOP_K])))

    typed = characters = 0
    held: list[dict[str, Any]] = []
    for text, context in measured:
        pressed, length = keystrokes(text, functools.partial(_shown, texts, context))
        typed += pressed
        characters += length
        cut = held_out(text)
        if cut is not None:
            prefix, reference = cut
            completion = texts[(prefix, context)]
            held.append({
                "prefix": prefix, "context": context, "completion": completion,
                "reference": reference, "matched": completion_matches(completion, reference),
                "max_tokens": max_tokens,
            })  # fmt: skip

    latencies = _latencies(model, positions, measured, latency_prefixes, max_tokens)
    metrics: dict[str, float | int | None] = {
        "perplexity": _perplexity(model, measured),
        "next_word_top1": sum(p.hit for p in positions) / len(positions),
        "next_word_top3": sum(p.hit_top for p in positions) / len(positions),
        "exact_match": sum(h["matched"] for h in held) / len(held),
        "keystrokes_saved": 1 - typed / characters,
        # numpy's default percentile: linear between order statistics, as every other
        # latency figure of the workbench (worker.evaluation.percentile).
        "latency_ms_per_token_p50": float(np.percentile(latencies, 50)),
        "latency_ms_per_token_p95": float(np.percentile(latencies, 95)),
        "replies": len(measured),
        "positions": len(positions),
    }
    return AutocompleteResult(
        metrics=metrics,
        samples=held[:samples],
        positions=positions,
        replies=len(measured),
        replies_in_set=len(replies),
        characters=characters,
        keystrokes=typed,
        held_out=len(held),
        max_tokens=max_tokens,
        device=str(getattr(model, "device", "cpu")),
    )


def _shown(texts: dict[tuple[str, str], str], context: str, prefix: str) -> str:
    """The suggestion shown after ``prefix`` (every boundary's was completed up front)."""
    return texts[(prefix, context)]


def _context(reply: ReplyLike) -> str:
    return str(getattr(reply, "context", "") or "")


def _latencies(
    model: CompleterLike,
    positions: list[Position],
    measured: list[tuple[str, str]],
    count: int,
    max_tokens: int,
) -> list[float]:
    """Milliseconds per generated token of single greedy calls on ``count`` positions
    spread evenly over all, after one untimed call (first-call allocations)."""
    step = max(1, len(positions) // max(1, count))
    chosen = positions[::step][:count]
    requests = [(p.prefix, measured[p.reply][1]) for p in chosen]
    model.complete(*requests[0], max_tokens=max_tokens)
    found: list[float] = []
    for prefix, context in requests:
        began = time.perf_counter()
        (completion, *_) = model.complete(prefix, context, max_tokens=max_tokens)
        elapsed = time.perf_counter() - began
        found.append(elapsed * 1000 / max(1, completion.tokens))
    return found


def _perplexity(model: CompleterLike, measured: list[tuple[str, str]]) -> float | None:
    likelihood = getattr(model, "token_log_likelihood", None)
    if not callable(likelihood):
        return None
    nll = 0.0
    tokens = 0
    for text, context in measured:
        total, count = likelihood(text, context)
        nll += float(total)
        tokens += int(count)
    return math.exp(nll / tokens) if tokens else None
