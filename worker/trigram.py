"""A per-tenant word trigram: the yardstick an autocomplete model is measured against.

The issue's floor: on the shared SGD services, a word trigram fitted on a tenant's replies
predicts the next word of a test reply 39-48 % of the time; a learnt model must clear it.
It answers what evaluation asks of :class:`worker.autocomplete.Completer` (``complete``,
``complete_batch``, ``next_words``), so :func:`worker.autocomplete_eval.evaluate_autocomplete`
measures both the same way. Pure Python: no torch.

- **words** are :func:`worker.autocomplete_text.words` (lower-cased, punctuation a word);
  each reply is ``<s> <s> w1 .. wn </s>``. The context (the customer's message) is not
  used: a word trigram sees only the last two words of the reply typed so far.
- **scores**: stupid backoff (Brants et al., 2007): ``c(u v w) / c(u v)`` where the
  trigram was seen, else ``0.4 * c(v w) / c(v)``, else ``0.16 * c(w) / N``. Ties go to the
  more frequent word, then to the alphabetically first: the same corpus gives the same
  predictions on every host.
- **a prefix ending mid-word** (its last character inside a word of letters/digits, as
  ``"Okay. Just"``): the typed part may be the whole word or the start of a longer one,
  as the Completer's token healing reads it. The candidates for that word are the
  vocabulary's words starting with it, ranked by their score; if the best is the typed
  word itself, the completion starts with the next word, otherwise with the rest of the
  longer word (glued to the typed part, as the Completer returns it).
- **completion text**: each word in its most frequent written form in the replies (case
  kept), a space before it unless the replies mostly write that pair without one
  (``"$440"``, ``"Okay."``); no space first after a prefix ending in whitespace. Greedy
  words until a sentence end (``.``, ``?``, ``!``), ``</s>`` or ``max_tokens`` words.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.autocomplete_text import MAX_TOKENS_DEFAULT, SENTENCE_ENDS, word_spans

START, END = "<s>", "</s>"
BACKOFF = 0.4
BASE_MODEL = "trigram"  # how base_metrics name it
# A context's followers: (their total count, [(word, count)] most frequent first, then the
# more frequent overall, then alphabetical), sorted once at fit time.
_Order = tuple[int, list[tuple[str, int]]]
_NONE: _Order = (1, [])


class ReplyLike(Protocol):
    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class TrigramCompletion:
    """As :class:`worker.autocomplete.Completion`: the text after the typed prefix, the
    mean log score per generated word, and how many words were generated."""

    text: str
    score: float
    tokens: int


@dataclass(frozen=True)
class _Typed:
    """A prefix as the trigram reads it: its complete words and, if it ends inside a word,
    that word's typed part (lower-cased and as written)."""

    history: tuple[str, ...]  # START, START, then the complete words
    partial: str | None
    partial_written: str
    space_typed: bool  # the prefix ends in whitespace (or is empty): no space first


class Trigram:
    """Word trigram counts of one tenant's replies (see the module's docstring)."""

    base_model = BASE_MODEL
    device = "cpu"

    def __init__(self) -> None:
        self.unigrams: Counter[str] = Counter()
        self.bigrams: dict[str, Counter[str]] = defaultdict(Counter)
        self.trigrams: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.total = 0
        self.replies = 0
        self._written: dict[str, Counter[str]] = defaultdict(Counter)
        # (previous word, word) -> [written with a space before, without]
        self._spacing: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self._vocabulary: list[str] = []  # sorted: the words starting with a typed part
        # Each context's followers, ordered (see _Order).
        self._after_two: dict[tuple[str, str], _Order] = {}
        self._after_one: dict[str, _Order] = {}
        self._overall: _Order = _NONE

    @classmethod
    def fit(cls, replies: Iterable[ReplyLike | str]) -> Trigram:
        """Count every reply's words (a reply is an object with ``text`` or a string)."""
        model = cls()
        for reply in replies:
            model._add(reply if isinstance(reply, str) else reply.text)
        model._vocabulary = sorted(w for w in model.unigrams if w != END)
        model._after_two = {key: _order(c, model.unigrams) for key, c in model.trigrams.items()}
        model._after_one = {key: _order(c, model.unigrams) for key, c in model.bigrams.items()}
        model._overall = _order(model.unigrams, model.unigrams)
        return model

    def _add(self, text: str) -> None:
        spans = word_spans(text)
        if not spans:
            return
        self.replies += 1
        sequence = [START, START]
        for index, (start, end) in enumerate(spans):
            written = text[start:end]
            word = written.lower()
            self._written[word][written] += 1
            if index:
                spaced = start > spans[index - 1][1]
                self._spacing[(sequence[-1], word)][0 if spaced else 1] += 1
            sequence.append(word)
        sequence.append(END)
        for u, v, w in zip(sequence, sequence[1:], sequence[2:], strict=False):
            self.unigrams[w] += 1
            self.bigrams[v][w] += 1
            self.trigrams[(u, v)][w] += 1
            self.total += 1

    # --- scores -----------------------------------------------------------------------------

    def score(self, word: str, history: Sequence[str]) -> float:
        """Stupid-backoff score of ``word`` after the last two words of ``history``."""
        u, v = history[-2], history[-1]
        seen = self.trigrams.get((u, v))
        if seen and word in seen:
            return seen[word] / sum(seen.values())
        after = self.bigrams.get(v)
        if after and word in after:
            return BACKOFF * after[word] / sum(after.values())
        return BACKOFF * BACKOFF * self.unigrams.get(word, 0) / max(1, self.total)

    def ranked(self, history: Sequence[str], k: int) -> list[tuple[str, float]]:
        """The ``k`` best next words (``END`` included) after ``history``, best first."""
        u, v = history[-2], history[-1]
        levels = (
            (self._after_two.get((u, v), _NONE), 1.0),
            (self._after_one.get(v, _NONE), BACKOFF),
            (self._overall, BACKOFF * BACKOFF),
        )
        scored: list[tuple[str, float]] = []
        taken: set[str] = set()
        # A level lists its words most frequent first, so its first k not scored above are
        # all it can add to the k best overall; a word takes its highest level's score.
        for (total, words), weight in levels:
            added = 0
            for word, count in words:
                if added == k:
                    break
                if word not in taken:
                    taken.add(word)
                    scored.append((word, weight * count / total))
                    added += 1
        scored.sort(key=lambda item: (-item[1], -self.unigrams.get(item[0], 0), item[0]))
        return scored[:k]

    def _extensions(self, typed: _Typed) -> list[tuple[str, float]]:
        """The words the typed part of the last word may be, best first."""
        assert typed.partial is not None
        start = bisect.bisect_left(self._vocabulary, typed.partial)
        found = []
        for word in self._vocabulary[start:]:
            if not word.startswith(typed.partial):
                break
            found.append((word, self.score(word, typed.history)))
        if typed.partial not in self.unigrams:  # never seen whole: still what was typed
            found.append((typed.partial, 0.0))
        found.sort(key=lambda item: (-item[1], -self.unigrams.get(item[0], 0), item[0]))
        return found

    # --- what evaluation asks ---------------------------------------------------------------

    def complete(
        self, prefix: str, context: str = "", *, max_tokens: int = MAX_TOKENS_DEFAULT, n: int = 1
    ) -> list[TrigramCompletion]:
        """The greedy completion of ``prefix`` (one: the trigram has no alternatives to
        offer ``n`` of): only the text after the typed prefix."""
        del context, n  # the trigram reads only the reply's own words
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        typed = _read(prefix)
        history = list(typed.history)
        pieces: list[str] = []
        logs: list[float] = []
        space_typed = typed.space_typed
        if typed.partial is not None:
            word, value = self._extensions(typed)[0]
            history.append(word)
            if word != typed.partial:  # the rest of a longer word, glued to the typed part
                pieces.append(self._form(word)[len(typed.partial_written) :])
                logs.append(_log(value))
        while len(logs) < max_tokens and not (pieces and pieces[-1].endswith(SENTENCE_ENDS)):
            best = [(w, s) for w, s in self.ranked(history, 2) if w != START]
            if not best or best[0][0] == END:
                break
            word, value = best[0]
            pieces.append(self._join(history[-1], word, first=not pieces and space_typed))
            history.append(word)
            logs.append(_log(value))
        text = "".join(pieces)
        return [TrigramCompletion(text, sum(logs) / len(logs) if logs else 0.0, len(logs))]

    def complete_batch(
        self, requests: Sequence[tuple[str, str]], *, max_tokens: int = MAX_TOKENS_DEFAULT
    ) -> list[TrigramCompletion]:
        return [self.complete(p, c, max_tokens=max_tokens)[0] for p, c in requests]

    def next_words(self, prefix: str, context: str = "", *, k: int = 3) -> list[str]:
        """``k`` distinct next words (the first word a completion would start with), best
        first: the greedy completion's first word leads."""
        del context
        found: list[str] = []
        for word in self._first_words(_read(prefix), k):
            if word not in found:
                found.append(word)
            if len(found) == k:
                break
        return found

    def _first_words(self, typed: _Typed, k: int) -> Iterator[str]:
        if typed.partial is None:
            yield from (w for w, _ in self.ranked(typed.history, k + 1) if w != END)
            return
        # The typed word's candidates in the order greedy weighs them; the typed word
        # itself stands for the words that would follow it.
        for word, _ in self._extensions(typed):
            if word != typed.partial:
                yield word[len(typed.partial) :]
            else:
                after = (*typed.history, word)
                yield from (w for w, _ in self.ranked(after, k + 1) if w != END)

    # --- text -------------------------------------------------------------------------------

    def _form(self, word: str) -> str:
        written = self._written.get(word)
        if not written:
            return word
        return min(written.items(), key=lambda item: (-item[1], item[0]))[0]

    def _join(self, previous: str, word: str, *, first: bool) -> str:
        form = self._form(word)
        if first or previous == START:
            return form
        spaced, unspaced = self._spacing.get((previous, word), (0, 0))
        if spaced == unspaced == 0:  # never seen together: punctuation attaches
            return form if (len(word) == 1 and not word.isalnum()) else f" {form}"
        return form if unspaced > spaced else f" {form}"


def _order(counts: Counter[str], overall: Counter[str]) -> _Order:
    """A context's followers in the order :meth:`Trigram.ranked` breaks ties by."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], -overall[item[0]], item[0]))
    return sum(counts.values()), ordered


def _read(prefix: str) -> _Typed:
    spans = word_spans(prefix)
    written = [prefix[s:e] for s, e in spans]
    lowered = [w.lower() for w in written]
    history = (START, START, *lowered)
    if spans and spans[-1][1] == len(prefix) and written[-1][-1].isalnum():
        return _Typed(history[:-1], lowered[-1], written[-1], False)
    return _Typed(history, None, "", not prefix or prefix[-1].isspace())


def _log(score: float) -> float:
    return math.log(score) if score > 0 else math.log(1e-12)
