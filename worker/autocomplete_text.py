"""Reply text as autocomplete models see it: words, sentence ends, request limits.

Pure Python (no torch): the web tier checks a completion request with it, the datasets app
profiles a reply corpus with it, and the evaluation, the trigram yardstick and the
benchmarks count words with the one definition below, so their figures are comparable:

* a **word** is a run of letters/digits (an apostrophe inside it kept, as in ``don't``) or
  one punctuation character, lower-cased: ``"Great, who's next?"`` is
  ``["great", ",", "who's", "next", "?"]``. Counting punctuation as words is what a
  reply's next keystrokes are: after "Great" the next thing typed is the comma;
* a completion **stops** at the end of a sentence (``.``, ``?`` or ``!`` generated, not
  part of the prefix) or after ``max_tokens`` tokens, whichever comes first.
"""

from __future__ import annotations

import re

# A word: letters and digits, an inner apostrophe kept; or any other single non-space.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]|_")
SENTENCE_ENDS = (".", "?", "!")

MAX_TOKENS_DEFAULT = 16
MAX_TOKENS_LIMIT = 64
N_LIMIT = 5
PREFIX_MAX_CHARS = 2000
CONTEXT_MAX_CHARS = 4000
STRATEGIES = ("greedy", "beam", "top_k")


def words(text: str) -> list[str]:
    """The words of ``text`` (see the module's docstring), lower-cased."""
    return [w.lower() for w in _WORD.findall(text)]


def word_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) character offsets of each of ``text``'s words, in order: where a
    prefix ending before word ``i`` is ``text[: spans[i][0]].rstrip()``."""
    return [m.span() for m in _WORD.finditer(text)]


def first_word(completion: str) -> str | None:
    """The first word of a completion (what next-word accuracy compares), or None."""
    match = _WORD.search(completion)
    return match.group(0).lower() if match else None


def ends_sentence(generated: str) -> bool:
    """Whether a completion's generated text has reached the end of a sentence."""
    return generated.rstrip().endswith(SENTENCE_ENDS)


def cut_at_sentence_end(generated: str) -> str:
    """``generated`` up to and including its first sentence end (all of it if none)."""
    for i, ch in enumerate(generated):
        if ch in SENTENCE_ENDS:
            # "3.5" is not a sentence end: a digit follows the point.
            if ch == "." and i + 1 < len(generated) and generated[i + 1].isdigit():
                continue
            return generated[: i + 1]
    return generated
