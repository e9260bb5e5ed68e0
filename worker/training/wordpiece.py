"""A deterministic WordPiece vocabulary learner.

The ``tokenizers`` library's ``WordPieceTrainer`` is not deterministic: it orders characters
with equal counts by hash-map iteration, so two trainings on the same texts can yield
different vocabularies, and so different token ids, weights and metrics. A run must be
reproducible from its seed, and a resumed run must see the tokenizer it started with, so the
vocabulary is learnt here instead, the way that trainer learns it: BPE-style merges of the
most frequent adjacent pair, ``##``-prefixed continuation pieces, with ties broken by the
pair's text. ``tokenizers`` still does the normalising, splitting and encoding.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable

from tokenizers import Tokenizer

PREFIX = "##"


def learn_vocabulary(
    tokenizer: Tokenizer,
    texts: Iterable[str],
    *,
    vocab_size: int,
    special_tokens: list[str],
    min_frequency: int = 2,
) -> list[str]:
    """Special tokens, then every character piece, then merged pieces, most frequent first.

    ``tokenizer`` supplies the normaliser and pre-tokeniser the vocabulary will be used with.
    Merging stops at ``vocab_size`` entries or when no pair occurs ``min_frequency`` times.
    """
    normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    word_counts: Counter[str] = Counter()
    for text in texts:
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        if pre_tokenizer is not None:
            word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalized))
        else:
            word_counts.update(normalized.split())

    distinct = sorted(word for word in word_counts if word)
    words = [[word[0], *(PREFIX + char for char in word[1:])] for word in distinct]
    counts = [word_counts[word] for word in distinct]
    vocab = list(special_tokens)
    vocab += sorted({symbol for symbols in words for symbol in symbols} - set(vocab))

    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in itertools.pairwise(symbols):
            pair_counts[pair] += counts[index]
            pair_words[pair].add(index)
    # A max-heap by count, ties to the smallest pair; stale entries are skipped when popped.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    known = set(vocab)

    while len(vocab) < vocab_size and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count:
            continue
        if -negative_count < min_frequency:
            break
        merged = pair[0] + _strip(pair[1])
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed: set[tuple[str, str]] = set()
        for index in sorted(pair_words.pop(pair, set())):
            symbols = words[index]
            for old in itertools.pairwise(symbols):
                pair_counts[old] -= counts[index]
                pair_words[old].discard(index)
                changed.add(old)
            words[index] = symbols = _merge(symbols, pair, merged)
            for new in itertools.pairwise(symbols):
                pair_counts[new] += counts[index]
                pair_words[new].add(index)
                changed.add(new)
        pair_counts.pop(pair, None)
        for item in sorted(changed - {pair}):
            if pair_counts[item] > 0:
                heapq.heappush(heap, (-pair_counts[item], item))
            else:
                del pair_counts[item]
    return vocab


def _merge(symbols: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    result, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            result.append(merged)
            i += 2
        else:
            result.append(symbols[i])
            i += 1
    return result


def _strip(symbol: str) -> str:
    return symbol.removeprefix(PREFIX)
