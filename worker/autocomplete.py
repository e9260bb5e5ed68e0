"""Per-tenant autocomplete models: a small GPT-2-shaped causal LM that completes an agent's reply.

A model is a directory (the version's artifact is these files, nothing else):

- ``autocomplete.json``: the meta (``format`` "workbench-autocomplete", ``version`` 1,
  ``base_model``, ``max_context_tokens``, ``max_length``, ``special_tokens``, ``stop``,
  ``vocab_size``): how a prompt is laid out and when a completion stops travel with the model;
- ``config.json``: the ``transformers.GPT2Config``;
- ``model.safetensors``: the weights (the LM head is tied to the token embeddings, so it is
  not stored twice);
- ``tokenizer.json``: the byte-level BPE ``tokenizers.Tokenizer`` learnt on the run's text.

A sequence is ``<|context|> context-ids <|reply|> reply-ids <|end|>``: the customer message
being answered (its last ``max_context_tokens`` tokens; none at all when there is no context),
then the reply. Training puts the loss on the reply ids and the end only
(:func:`encode_reply`), so the model learns to write replies, not customer messages.

Decoding (:class:`Completer`), greedy by default and deterministic:

- **cache**: each step feeds only the new token, reusing the keys/values of everything before
  it (the model's ``cache``, once called ``past_key_values``); ``use_cache=False`` recomputes
  the whole sequence each step instead (the benchmark's baseline) and gives the same text;
- **token healing**: a prefix usually ends inside a word ("Which acc"), and the tokens of
  " acc" are not how " account" was ever seen in training. The last pre-token of the prefix
  (the byte-level pre-tokenizer's unit: a word with its leading space, a number, a run of
  punctuation or trailing whitespace) is taken off the prompt, and the first generated
  tokens are constrained to spell it out (a token is allowed while its bytes are a prefix of
  what is left of the typed part, or start with all of it). The returned ``text`` is only
  what comes after the typed prefix;
- **stop**: at ``<|end|>``, at the end of a sentence (``autocomplete_text.cut_at_sentence_end``,
  applied to the generated text only: a point followed by a digit is not an end, so a
  completion ending in "." waits one more token to see whether "3." becomes "3.5") or after
  ``max_tokens`` tokens;
- **sessions** (:class:`SessionState`): a session keeps the ids and keys/values of its last
  call; the next call whose prompt shares a prefix with them crops the cache to the common
  prefix and feeds only the rest (``last_cached_tokens`` says how many were reused);
- **batches** (:meth:`Completer.complete_batch`): several prompts greedy in one forward per
  step, left padded with an attention mask and per-row position ids, each result the one the
  prompt gets alone.

Torch and transformers are imported here: the web tier and ``apps/*`` import this module only
inside worker-side functions.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache

from worker import autocomplete_text, base_models

FORMAT = "workbench-autocomplete"
FORMAT_VERSION = 1
BASE_MODEL = base_models.TINY_GPT2
META_FILE = "autocomplete.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
ARTIFACT_FILES = (META_FILE, CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)

SPECIAL = {"pad": "<|pad|>", "context": "<|context|>", "reply": "<|reply|>", "end": "<|end|>"}
MAX_CONTEXT_TOKENS = 64
MAX_LENGTH = 128
DEFAULT_SHAPE = base_models.TINY_GPT2_SHAPE  # the catalogue's, read at each call
STRATEGIES = autocomplete_text.STRATEGIES
# Room kept after the prompt for the completion: a long reply prefix loses its oldest tokens
# so that prompt + completion stays within the length the model was trained on.
PROMPT_RESERVE = autocomplete_text.MAX_TOKENS_DEFAULT
# A typed last piece longer than this (a pasted run of letters) is not healed: spelling it
# out token by token would cost more steps than the completion itself.
HEAL_MAX_BYTES = 32
BEAM_WIDTH = 4
# Paths tried per wanted distinct next word (next_words, greedy n > 1), in up to
# BRANCH_ROUNDS rounds: likely next tokens often begin the same word (" acc", " account").
BRANCHES_PER_WORD = 3
BRANCH_ROUNDS = 3
WORD_MAX_TOKENS = 8


class CompleterError(ValueError):
    """A malformed autocomplete model directory or artifact."""


# -- tokenizer ------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 4000, min_frequency: int = 2
) -> Tokenizer:
    """A byte-level BPE tokenizer learnt on ``texts``; the special tokens take ids 0-3.

    Byte level: every byte is in the alphabet, so no text is ever unknown to the model.
    ``tokenizers``' BPE trainer breaks ties between equally frequent pairs by the pair's
    ids, which come from the sorted alphabet: the same texts give the same vocabulary in
    every process (the tests train twice and compare).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def gpt2_config(vocab_size: int, **shape: Any) -> GPT2Config:
    """The GPT-2 config of a tiny model over ``vocab_size`` ids (``shape`` overrides
    :data:`DEFAULT_SHAPE` and any other ``GPT2Config`` field, e.g. dropouts)."""
    # train_tokenizer puts <|pad|> at 0 and <|end|> at 3 (GPT-2's own 50256 is not there).
    dropout = base_models.TINY_GPT2_DROPOUT
    values: dict[str, Any] = {
        **DEFAULT_SHAPE,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "bos_token_id": 3,
        "eos_token_id": 3,
        "pad_token_id": 0,
        **shape,
    }
    return GPT2Config(vocab_size=vocab_size, **values)


def new_meta(
    tokenizer: Tokenizer,
    *,
    base_model: str = BASE_MODEL,
    max_context_tokens: int = MAX_CONTEXT_TOKENS,
    max_length: int = MAX_LENGTH,
) -> dict[str, Any]:
    """The ``autocomplete.json`` of a model using ``tokenizer``."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "base_model": base_model,
        "max_context_tokens": max_context_tokens,
        "max_length": max_length,
        "special_tokens": dict(SPECIAL),
        "stop": {
            "sentence_ends": list(autocomplete_text.SENTENCE_ENDS),
            "end_token": SPECIAL["end"],
        },
        "vocab_size": tokenizer.get_vocab_size(),
    }


def special_ids(tokenizer: Tokenizer, meta: Mapping[str, Any]) -> dict[str, int]:
    """Role ("pad", "context", "reply", "end") -> id; a pretrained tokenizer holds them
    after its own vocabulary, so ids are looked up, never assumed."""
    ids = {}
    for role, token in dict(meta.get("special_tokens") or SPECIAL).items():
        token_id = tokenizer.token_to_id(str(token))
        if token_id is None:
            raise CompleterError(f"the tokenizer lacks the special token {token!r}")
        ids[str(role)] = int(token_id)
    missing = set(SPECIAL) - set(ids)
    if missing:
        raise CompleterError(f"special_tokens lacks {', '.join(sorted(missing))}")
    return ids


def encode_reply(
    tokenizer: Tokenizer,
    text: str,
    context: str = "",
    *,
    meta: Mapping[str, Any],
    ids: Mapping[str, int] | None = None,
) -> tuple[list[int], list[int]]:
    """A training sequence and its labels: ``<|context|> ctx <|reply|> reply <|end|>`` cut at
    ``max_length``; labels are -100 but on the reply ids and the end (those are predicted)."""
    ids = ids if ids is not None else special_ids(tokenizer, meta)
    head = _context_ids(tokenizer, context, int(meta["max_context_tokens"]), ids)
    reply = [*_encode(tokenizer, text), ids["end"]]
    sequence = (head + reply)[: int(meta["max_length"])]
    labels = ([-100] * len(head) + reply)[: len(sequence)]
    return sequence, labels


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids) if text else []


def _context_ids(
    tokenizer: Tokenizer, context: str, max_context_tokens: int, ids: Mapping[str, int]
) -> list[int]:
    context_ids = _encode(tokenizer, context.strip())
    kept = context_ids[-max_context_tokens:] if max_context_tokens > 0 else []
    return [ids["context"], *kept, ids["reply"]]


# -- GPT-2's byte <-> unicode table, to read a token's exact bytes ------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what byte-level BPE stores)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in characters), strict=True))


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def _token_bytes(tokenizer: Tokenizer, special: Iterable[int]) -> list[bytes]:
    """Each id's bytes; special tokens (and any id not in the table) as b"" ."""
    special = set(special)
    out: list[bytes] = []
    for token_id in range(tokenizer.get_vocab_size()):
        token = tokenizer.id_to_token(token_id)
        if token is None or token_id in special:
            out.append(b"")
            continue
        try:
            out.append(bytes(_UNICODE_TO_BYTE[char] for char in token))
        except KeyError:
            # An added token that is not byte-level (a pretrained tokenizer's extra).
            out.append(b"")
    return out


# -- model directory ------------------------------------------------------------------------


def build_model(config: GPT2Config) -> GPT2LMHeadModel:
    """A freshly initialised model (torch's RNG: seed it first)."""
    return GPT2LMHeadModel(config)


def write_completer_dir(
    directory: Path, model: Any, tokenizer: Tokenizer, meta: dict[str, Any]
) -> None:
    """Write the four files of a model into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    tied = _tied_keys(model)
    tensors = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if name not in tied
    }
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(model.config.to_json_string())
    (directory / TOKENIZER_FILE).write_text(tokenizer.to_str())
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))


def _tied_keys(model: Any) -> set[str]:
    """State-dict keys that are the same tensor as an earlier key (the tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict().items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            tied.add(name)
        else:
            seen[pointer] = name
    return tied


def is_completer_dir(path: Path) -> bool:
    return (path / META_FILE).is_file()


def _parse_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise CompleterError(f"{META_FILE} is not JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CompleterError(f"{META_FILE} does not describe an autocomplete model")
    if meta.get("version") != FORMAT_VERSION:
        raise CompleterError(f"unsupported autocomplete model version {meta.get('version')!r}")
    return meta


def read_meta(directory: Path) -> dict[str, Any]:
    return _parse_meta((directory / META_FILE).read_bytes())


def load_completer_files(files: Mapping[str, bytes], *, device: str = "cpu") -> Completer:
    """From the raw bytes of the four artifact files (what a replica unpacks)."""
    try:
        meta = _parse_meta(files[META_FILE])
        config = GPT2Config.from_dict(json.loads(files[CONFIG_FILE]))
        tokenizer = Tokenizer.from_str(files[TOKENIZER_FILE].decode("utf-8"))
        tensors = load_safetensors(files[WEIGHTS_FILE])
    except CompleterError:
        raise
    except KeyError as error:
        raise CompleterError(f"autocomplete model lacks {error.args[0]}") from error
    except Exception as error:  # bad JSON, a bad safetensors header, a bad tokenizer
        raise CompleterError(f"unreadable autocomplete model: {error}") from error
    model = build_model(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # The tied LM head is not stored; anything else missing is a broken artifact.
    missing = [name for name in missing if name not in _tied_keys(model)]
    if missing or unexpected:
        raise CompleterError(
            f"autocomplete weights do not fit the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return Completer(model, tokenizer, meta, device=device)


def load_completer(directory: Path, *, device: str = "cpu") -> Completer:
    """The model saved in ``directory`` by :func:`write_completer_dir`."""
    try:
        files = {name: (directory / name).read_bytes() for name in ARTIFACT_FILES}
    except FileNotFoundError as error:
        raise CompleterError(f"autocomplete model lacks {Path(error.filename).name}") from error
    return load_completer_files(files, device=device)


def load_training_dir(directory: Path) -> tuple[GPT2LMHeadModel, Tokenizer, dict[str, Any]]:
    """Model (trainable, CPU), tokenizer and meta of a model directory (a checkpoint's)."""
    completer = load_completer(directory)
    return completer.model, completer.tokenizer, completer.meta


# -- decoding -------------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    score: float  # mean log-probability per generated token
    tokens: int  # tokens generated (the healed typed part and the end token included)


@dataclass
class SessionState:
    """One session's cache: the ids whose keys/values ``cache`` holds, from its last call.

    The next :meth:`Completer.complete` with ``session=`` reuses the longest common prefix of
    those ids and its prompt (cropping the cache to it) and feeds only the rest;
    ``last_cached_tokens`` is how many prompt tokens that call did not recompute. Belongs to
    one Completer (another model's keys mean nothing): used with another, it starts over.
    """

    ids: list[int] = field(default_factory=list)
    cache: Any = None
    last_cached_tokens: int = 0
    owner: int = 0  # id() of the Completer that filled it

    def reset(self) -> None:
        self.ids, self.cache, self.owner = [], None, 0


@dataclass
class _Row:
    """One sequence being decoded."""

    need: bytes  # the typed bytes the next tokens must still spell out (token healing)
    typed: int  # bytes of the typed part, dropped from the returned text
    generated: list[int] = field(default_factory=list)
    out: bytearray = field(default_factory=bytearray)
    logprob: float = 0.0
    done: bool = False
    # Only for next_words: stop as soon as the first word is complete.
    word_only: bool = False

    def text(self) -> str:
        return bytes(self.out[self.typed :]).decode("utf-8", errors="ignore")

    def completion(self) -> Completion:
        text = autocomplete_text.cut_at_sentence_end(self.text())
        tokens = len(self.generated)
        score = self.logprob / tokens if tokens else 0.0
        return Completion(text=text, score=score, tokens=tokens)


class _Sequences:
    """Forward passes over a batch of sequences: with the key/value cache (each step feeds
    the new token only) or without (each step recomputes every sequence from the start).

    Sequences are left padded: row i's real tokens are the last ``lengths[i]`` of ``ids[i]``
    in the cache's time axis; the attention mask hides the padding and the position ids
    count real tokens only, so a row computes what it would alone.
    """

    def __init__(self, completer: Completer, use_cache: bool) -> None:
        self.c = completer
        self.use_cache = use_cache
        self.ids: list[list[int]] = []  # every row's real ids so far (prompt + fed tokens)
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] over the cache's time axis
        self.cached_prefix = 0

    def prefill(
        self, prompts: Sequence[list[int]], session: SessionState | None = None
    ) -> torch.Tensor:
        """Feed the prompts; the log-probabilities of each row's next token, [B, V]."""
        self.ids = [list(p) for p in prompts]
        if not self.use_cache:
            if session is not None:
                session.last_cached_tokens = 0
            return self._recompute()
        if session is not None and len(prompts) == 1:
            return self._prefill_session(prompts[0], session)
        self.cache = DynamicCache(config=self.c.model.config)
        width = max(len(p) for p in prompts)
        pad = self.c.ids["pad"]
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(input_ids, positions, self.mask, self.cache)

    def _prefill_session(self, prompt: list[int], session: SessionState) -> torch.Tensor:
        if session.owner != id(self.c):
            session.reset()
        common = 0
        for a, b in zip(session.ids, prompt, strict=False):
            if a != b:
                break
            common += 1
        # The last prompt token is always fed: its logits are what the next token needs.
        common = min(common, len(prompt) - 1)
        if session.cache is not None and common > 0:
            cache = session.cache
            cache.crop(common - cache.get_seq_length())
        else:
            cache, common = DynamicCache(config=self.c.model.config), 0
        self.cache, self.cached_prefix = cache, common
        session.last_cached_tokens = common
        self.mask = torch.ones(1, len(prompt), dtype=torch.long)
        rest = torch.tensor([prompt[common:]])
        positions = torch.arange(common, len(prompt)).unsqueeze(0)
        return self._forward(rest, positions, self.mask, cache)

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to each row; the next log-probabilities, [B, V]."""
        for row, token in zip(self.ids, tokens, strict=True):
            row.append(token)
        if not self.use_cache:
            return self._recompute()
        assert self.mask is not None
        positions = self.mask.sum(-1, keepdim=True)  # real tokens so far = the next position
        self.mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=torch.long)], dim=1)
        return self._forward(torch.tensor([[t] for t in tokens]), positions, self.mask, self.cache)

    def select(self, rows: Sequence[int]) -> None:
        """Keep (and repeat) rows by index: beam search's reorder, a prompt's copies."""
        self.ids = [list(self.ids[i]) for i in rows]
        if self.use_cache:
            index = torch.tensor(list(rows), device=self.c.device)
            self.cache.batch_select_indices(index)
            assert self.mask is not None
            self.mask = self.mask[torch.tensor(list(rows))]

    def _recompute(self) -> torch.Tensor:
        width = max(len(r) for r in self.ids)
        pad = self.c.ids["pad"]
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in self.ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in self.ids])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(input_ids, positions, mask, None)

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        device = self.c.device
        output = self.c.model(
            input_ids=input_ids.to(device),
            position_ids=positions.to(device),
            attention_mask=mask.to(device),
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=1,
        )
        if cache is not None:
            self.cache = output.cache
        return torch.log_softmax(output.logits[:, -1, :].float(), dim=-1).cpu()


class Completer:
    """A loaded model, its tokenizer and meta; eval mode, no gradients."""

    def __init__(
        self, model: GPT2LMHeadModel, tokenizer: Tokenizer, meta: dict[str, Any], *, device: str
    ) -> None:
        self.model = model
        module: torch.nn.Module = model  # transformers' own typing of .to() is a decorator's
        module.to(device)
        module.train(False)
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
        self.max_length = int(meta["max_length"])
        self.max_context_tokens = int(meta["max_context_tokens"])
        self.n_positions = int(model.config.n_positions)
        self.ids = special_ids(tokenizer, meta)
        self._bytes = _token_bytes(tokenizer, self.ids.values())
        vocab = len(self._bytes)
        # Ids a completion never produces: the structural tokens, and the model's ids past
        # the tokenizer's (a pretrained model's padded embedding table).
        self._never = torch.zeros(max(vocab, int(model.config.vocab_size)), dtype=torch.bool)
        self._never[vocab:] = True
        for role in ("pad", "context", "reply"):
            self._never[self.ids[role]] = True
        self._allowed_cache: dict[bytes, torch.Tensor] = {}

    # -- prompts ----------------------------------------------------------------------------

    def split_prefix(self, prefix: str) -> tuple[str, str]:
        """(the prompt's part, the typed part to heal): the typed part is the prefix's last
        pre-token (" acc", "440", ",", trailing spaces), or "" when there is nothing to heal."""
        if not prefix:
            return "", ""
        assert self.tokenizer.pre_tokenizer is not None
        pieces = self.tokenizer.pre_tokenizer.pre_tokenize_str(prefix)
        if not pieces:
            return prefix, ""
        start = pieces[-1][1][0]
        typed = prefix[start:]
        if len(typed.encode("utf-8")) > HEAL_MAX_BYTES:
            return prefix, ""
        return prefix[:start], typed

    def prompt_ids(self, prefix: str, context: str = "") -> list[int]:
        """The ids fed before decoding: context, reply marker and the prefix up to its
        healed last piece; the oldest reply tokens go first if it would not fit."""
        head, _ = self.split_prefix(prefix)
        return self._prompt(head, context)

    def _prompt(self, head: str, context: str) -> list[int]:
        marker = _context_ids(self.tokenizer, context, self.max_context_tokens, self.ids)
        reply = _encode(self.tokenizer, head)
        room = max(self.max_length - PROMPT_RESERVE - len(marker), 0)
        if len(reply) > room:
            # Rather the reply's recent words than the customer's message: drop context first.
            marker = [self.ids["context"], self.ids["reply"]]
            room = max(self.max_length - PROMPT_RESERVE - len(marker), 0)
            reply = reply[len(reply) - room :] if room else []
        return marker + reply

    def _rows(self, prefix: str, context: str) -> tuple[list[int], _Row]:
        head, typed = self.split_prefix(prefix)
        typed_bytes = typed.encode("utf-8")
        return self._prompt(head, context), _Row(need=typed_bytes, typed=len(typed_bytes))

    # -- choosing tokens --------------------------------------------------------------------

    def _allowed(self, need: bytes) -> torch.Tensor:
        """Ids allowed while ``need`` is still to be spelt out: a token that is a prefix of
        it or starts with all of it."""
        mask = self._allowed_cache.get(need)
        if mask is None:
            ok = [bool(b) and (b.startswith(need) or need.startswith(b)) for b in self._bytes]
            mask = torch.zeros_like(self._never)
            mask[: len(ok)] = torch.tensor(ok)
            if len(self._allowed_cache) > 4096:
                self._allowed_cache.clear()
            self._allowed_cache[need] = mask
        return mask

    def _masked(self, logprobs: torch.Tensor, row: _Row) -> torch.Tensor:
        """``logprobs`` [V] with what the row may not produce at -inf."""
        banned = self._never[: logprobs.shape[-1]]
        if row.need:
            banned = banned | ~self._allowed(row.need)[: logprobs.shape[-1]]
        return logprobs.masked_fill(banned, -math.inf)

    def _advance(self, row: _Row, token: int, logprob: float, max_tokens: int, length: int) -> None:
        """Record ``token`` for ``row`` and decide whether the row is done."""
        row.generated.append(token)
        row.logprob += logprob
        if token == self.ids["end"]:
            row.done = True
            return
        piece = self._bytes[token]
        row.out += piece
        if row.need:
            row.need = b"" if piece.startswith(row.need) else row.need[len(piece) :]
        if length + 1 >= self.n_positions:
            row.done = True
        if row.need:
            return  # still spelling out what was typed: nothing generated yet
        text = row.text()
        row.done = row.done or (
            (row.word_only and _word_complete(text))
            or _sentence_ended(text)
            or len(row.generated) - self._healing_tokens(row) >= max_tokens
        )

    def _healing_tokens(self, row: _Row) -> int:
        """Tokens of ``row`` that spelt out the typed part (not counted against max_tokens:
        with ``max_tokens=1`` "Which acc" still gets a token past "acc")."""
        spelt, count = 0, 0
        for token in row.generated:
            if spelt >= row.typed:
                break
            spelt += len(self._bytes[token])
            count += 1
        # The token that finished the typed part and went past it is a generated one.
        return count - 1 if spelt > row.typed else count

    # -- strategies -------------------------------------------------------------------------

    @torch.no_grad()
    def complete(
        self,
        prefix: str,
        context: str = "",
        *,
        max_tokens: int = autocomplete_text.MAX_TOKENS_DEFAULT,
        n: int = 1,
        strategy: str = "greedy",
        top_k: int = 5,
        seed: int = 0,
        use_cache: bool = True,
        session: SessionState | None = None,
    ) -> list[Completion]:
        """Up to ``n`` completions of ``prefix`` (the reply typed so far), best first.

        greedy: deterministic; with ``n`` > 1 the greedy completion then ones starting with
        the next most likely distinct words. beam: a beam of max(n, 4) by mean log-prob.
        top_k: ``n`` samples from the ``top_k`` most likely tokens each step, seeded by
        ``seed`` (same seed, same samples), distinct texts kept.
        """
        if max_tokens < 1 or n < 1:
            raise ValueError("max_tokens and n must be >= 1")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
        if strategy == "greedy" and n == 1:
            prompt, row = self._rows(prefix, context)
            return [self._greedy([prompt], [row], max_tokens, use_cache, session)[0]]
        if strategy == "greedy":
            prompt, row = self._rows(prefix, context)
            greedy = self._greedy([prompt], [row], max_tokens, use_cache, session)[0]
            out, words = [greedy], {autocomplete_text.first_word(greedy.text) or ""}
            for word, completion in self._branches(
                prefix, context, n + 1, max_tokens, use_cache, None
            ):
                if word not in words and len(out) < n:
                    words.add(word)
                    out.append(completion)
            return out
        if strategy == "beam":
            return self._beam(prefix, context, n, max_tokens, use_cache, session)
        return self._sample(prefix, context, n, top_k, seed, max_tokens, use_cache, session)

    @torch.no_grad()
    def complete_batch(
        self,
        requests: Sequence[tuple[str, str]],
        *,
        max_tokens: int = autocomplete_text.MAX_TOKENS_DEFAULT,
        stop_at_word: bool = False,
    ) -> list[Completion]:
        """Greedy completions of several (prefix, context) at once, one padded forward per
        step; each equal to :meth:`complete` of that request alone.

        ``stop_at_word``: each stops once its first word is complete (what next-word
        accuracy needs: the greedy path, so the first word, is the full completion's).
        """
        if not requests:
            return []
        prompts, rows = zip(*(self._rows(p, c) for p, c in requests), strict=True)
        for row in rows:
            row.word_only = stop_at_word
        return self._greedy(list(prompts), list(rows), max_tokens, True, None)

    def _greedy(
        self,
        prompts: list[list[int]],
        rows: list[_Row],
        max_tokens: int,
        use_cache: bool,
        session: SessionState | None,
    ) -> list[Completion]:
        sequences = _Sequences(self, use_cache)
        logprobs = sequences.prefill(prompts, session)
        self._run_greedy(sequences, logprobs, rows, max_tokens)
        if session is not None and use_cache:
            self._keep(session, sequences)
        return [row.completion() for row in rows]

    def _run_greedy(
        self, sequences: _Sequences, logprobs: torch.Tensor, rows: list[_Row], max_tokens: int
    ) -> None:
        while True:
            tokens = []
            for i, row in enumerate(rows):
                if row.done:
                    tokens.append(self.ids["pad"])
                    continue
                masked = self._masked(logprobs[i], row)
                token = int(masked.argmax())
                self._advance(row, token, float(masked[token]), max_tokens, len(sequences.ids[i]))
                tokens.append(token)
            if all(row.done for row in rows):
                return
            logprobs = sequences.step(tokens)

    def _keep(self, session: SessionState, sequences: _Sequences) -> None:
        """The session keeps the one row's ids and cache for its next call."""
        length = sequences.cache.get_seq_length()
        session.ids = sequences.ids[0][:length]
        session.cache = sequences.cache
        session.owner = id(self)

    def _branches(
        self,
        prefix: str,
        context: str,
        k: int,
        max_tokens: int,
        use_cache: bool,
        session: SessionState | None,
        *,
        word_only: bool = False,
    ) -> list[tuple[str, Completion]]:
        """(first word, completion) for up to ``k`` distinct first words, likeliest first.

        The branching point is where the next word starts: while the typed part is being
        spelt out, the likeliest spelling is followed (the alternatives there are spellings
        of the same word), and the tokens that finish the typed part and run past it are
        candidates; once it is spelt, every next token is. Candidates are ranked by the
        log-probability of their whole path, and each is continued greedily.
        """
        prompt, start = self._rows(prefix, context)
        sequences = _Sequences(self, use_cache)
        logprobs = sequences.prefill([prompt], session)[0]
        if session is not None and use_cache:
            # The session keeps the prompt's cache; the steps below work on a copy.
            session.ids, session.cache, session.owner = list(prompt), sequences.cache, id(self)
            sequences.cache = copy.deepcopy(sequences.cache)
        width = k * BRANCHES_PER_WORD
        path: list[int] = []
        need, total = start.need, 0.0
        candidates: list[tuple[float, list[int]]] = []
        while True:
            masked = self._masked(logprobs, _Row(need=need, typed=0))
            allowed = int(torch.isfinite(masked).sum())
            order = masked.argsort(descending=True)
            if not need:
                candidates += [
                    (total + float(masked[t]), [*path, t])
                    for t in order[: min(allowed, width * BRANCH_ROUNDS)].tolist()
                ]
                break
            follow = None
            for token in order[:allowed].tolist():
                if len(self._bytes[token]) > len(need):
                    candidates.append((total + float(masked[token]), [*path, token]))
                elif follow is None:
                    follow = token
            if follow is None or len(prompt) + len(path) + 2 >= self.n_positions:
                break
            total += float(masked[follow])
            path.append(follow)
            need = need[len(self._bytes[follow]) :]
            logprobs = sequences.step([follow])[0]
        candidates.sort(key=lambda item: -item[0])
        candidates = candidates[: width * BRANCH_ROUNDS]

        found: list[tuple[str, Completion]] = []
        # In rounds: a confident model's likeliest paths often begin the same word.
        for begin in range(0, len(candidates), width):
            chunk = candidates[begin : begin + width]
            rows = []
            for total, tokens in chunk:
                row = _Row(need=start.need, typed=start.typed, word_only=word_only)
                for index, token in enumerate(tokens):
                    self._advance(row, token, 0.0, max_tokens, len(prompt) + index)
                row.logprob = total
                rows.append(row)
            branch = _Sequences(self, use_cache)
            next_logprobs = branch.prefill([prompt + tokens for _, tokens in chunk])
            if not all(row.done for row in rows):
                self._run_greedy(branch, next_logprobs, rows, max_tokens)
            for row in rows:
                completion = row.completion()
                word = autocomplete_text.first_word(completion.text) or ""
                if all(word != w for w, _ in found):
                    found.append((word, completion))
                if len(found) == k:
                    return found
        return found

    def _beam(
        self,
        prefix: str,
        context: str,
        n: int,
        max_tokens: int,
        use_cache: bool,
        session: SessionState | None,
    ) -> list[Completion]:
        prompt, start = self._rows(prefix, context)
        width = max(n, BEAM_WIDTH)
        sequences = _Sequences(self, use_cache)
        logprobs = sequences.prefill([prompt], session)
        if session is not None and use_cache:
            session.ids, session.cache, session.owner = list(prompt), sequences.cache, id(self)
            sequences.cache = copy.deepcopy(sequences.cache)
        beams, finished = [start], []
        while beams:
            scored: list[tuple[float, int, int]] = []  # (total logprob, beam, token)
            for b, beam in enumerate(beams):
                masked = self._masked(logprobs[b], beam)
                top = masked.topk(min(width, masked.shape[-1]))
                for value, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    if math.isfinite(value):
                        scored.append((beam.logprob + value, b, int(token)))
            # Ties to the lower beam and token id: deterministic.
            scored.sort(key=lambda item: (-item[0], item[1], item[2]))
            parents, survivors = [], []
            for total, b, token in scored[:width]:
                beam = copy.copy(beams[b])
                beam.generated, beam.out = list(beam.generated), bytearray(beam.out)
                length = len(prompt) + len(beam.generated)
                self._advance(beam, token, total - beam.logprob, max_tokens, length)
                if beam.done:
                    finished.append(beam)
                else:
                    parents.append(b)
                    survivors.append(beam)
            if len(finished) >= width or not survivors:
                break
            sequences.select(parents)
            beams = survivors
            logprobs = sequences.step([beam.generated[-1] for beam in beams])
        pool = finished or beams
        ranked = sorted((beam.completion() for beam in pool), key=lambda c: -c.score)
        return _distinct(ranked, n)

    def _sample(
        self,
        prefix: str,
        context: str,
        n: int,
        top_k: int,
        seed: int,
        max_tokens: int,
        use_cache: bool,
        session: SessionState | None,
    ) -> list[Completion]:
        prompt, start = self._rows(prefix, context)
        sequences = _Sequences(self, use_cache)
        logprobs = sequences.prefill([prompt], session)
        if session is not None and use_cache:
            session.ids, session.cache, session.owner = list(prompt), sequences.cache, id(self)
            sequences.cache = copy.deepcopy(sequences.cache)
        sequences.select([0] * n)
        logprobs = logprobs.repeat(n, 1)
        rows = [_Row(need=start.need, typed=start.typed) for _ in range(n)]
        generator = torch.Generator().manual_seed(seed)
        while True:
            tokens = []
            for i, row in enumerate(rows):
                if row.done:
                    tokens.append(self.ids["pad"])
                    continue
                masked = self._masked(logprobs[i], row)
                top = masked.topk(max(1, min(top_k, masked.shape[-1])))
                probs = torch.softmax(top.values, dim=-1).nan_to_num(0.0)
                pick = int(torch.multinomial(probs, 1, generator=generator))
                token = int(top.indices[pick])
                self._advance(row, token, float(masked[token]), max_tokens, len(sequences.ids[i]))
                tokens.append(token)
            if all(row.done for row in rows):
                break
            logprobs = sequences.step(tokens)
        ranked = sorted((row.completion() for row in rows), key=lambda c: -c.score)
        return _distinct(ranked, n)

    @torch.no_grad()
    def next_words(self, prefix: str, context: str = "", *, k: int = 3) -> list[str]:
        """Up to ``k`` distinct next words, best first; the first is the greedy completion's
        first word (next-word top-1 and top-3 agree on it)."""
        prompt, row = self._rows(prefix, context)
        # Stopped at its first word: the greedy path up to there is the full completion's.
        row.word_only = True
        greedy = self._greedy([prompt], [row], autocomplete_text.MAX_TOKENS_DEFAULT, True, None)
        top = autocomplete_text.first_word(greedy[0].text)
        found = [] if top is None else [top]
        if k > len(found):
            for word, _ in self._branches(
                prefix, context, k + 1, WORD_MAX_TOKENS, True, None, word_only=True
            ):
                if word and word not in found:
                    found.append(word)
                if len(found) == k:
                    break
        return found[:k]

    @torch.no_grad()
    def token_log_likelihood(self, text: str, context: str = "") -> tuple[float, int]:
        """(summed negative log-likelihood of the reply's tokens and its end, tokens counted):
        perplexity is exp(sum / count) over a corpus."""
        ids, labels = encode_reply(self.tokenizer, text, context, meta=self.meta, ids=self.ids)
        input_ids = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        targets = torch.tensor(labels[1:], device=self.device)
        nll = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        return float(nll), int((targets != -100).sum())


def _word_complete(text: str) -> bool:
    """Whether ``text``'s first word is followed by something (so it cannot grow)."""
    spans = autocomplete_text.word_spans(text)
    return bool(spans) and spans[0][1] < len(text)


def _sentence_ended(text: str) -> bool:
    """A sentence end with something after it, or "?"/"!" last (a final "." waits a token:
    "3." may become "3.5")."""
    cut = autocomplete_text.cut_at_sentence_end(text)
    return len(cut) < len(text) or text.endswith(("?", "!"))


def _distinct(completions: list[Completion], n: int) -> list[Completion]:
    seen: set[str] = set()
    out = []
    for completion in completions:
        if completion.text not in seen:
            seen.add(completion.text)
            out.append(completion)
        if len(out) == n:
            break
    return out


__all__ = [
    "ARTIFACT_FILES",
    "SPECIAL",
    "Completer",
    "CompleterError",
    "Completion",
    "SessionState",
    "build_model",
    "encode_reply",
    "gpt2_config",
    "is_completer_dir",
    "load_completer",
    "load_completer_files",
    "new_meta",
    "read_meta",
    "train_tokenizer",
    "write_completer_dir",
]
