"""Building a fresh tokenizer and classifier from a catalogued base model."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from worker import base_models
from worker.training import wordpiece

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build(
    base_model: str,
    *,
    texts: list[str],
    labels: list[str],
    max_length: int,
    lora: dict[str, Any] | None = None,
) -> tuple[Any, PreTrainedTokenizerBase]:
    """A new classifier for ``labels`` and its tokenizer (trained on ``texts`` if needed);
    an adapter base gets a LoRA adapter of shape ``lora`` (``TrainConfig.lora()``).

    Model weights are initialised from the global torch RNG: seed it first.
    """
    if base_models.get(base_model).format == base_models.FORMAT_ADAPTER:
        from worker import adapters

        if lora is None:
            raise ValueError(f"{base_model!r} needs its LoRA parameters")
        return adapters.build_adapter_classifier(
            base_model, lora=lora, labels=labels, max_length=max_length
        )
    id2label = dict(enumerate(labels))
    label2id = {label: index for index, label in id2label.items()}
    if base_model == base_models.TINY_BERT:
        tokenizer = train_wordpiece(texts, max_length=max_length)
        config = base_models.tiny_bert_config(vocab_size=len(tokenizer), num_labels=len(labels))
        config.id2label, config.label2id = id2label, label2id
        config.pad_token_id = tokenizer.pad_token_id
        model: PreTrainedModel = BertForSequenceClassification(config)
        return model, tokenizer
    if base_model == base_models.MINILM_L6:
        path = base_models.minilm_path()
        pretrained: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            path, local_files_only=True
        )
        pretrained.model_max_length = max_length
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
        )
        return model, pretrained
    raise base_models.UnknownBaseModel(f"unknown base model {base_model!r}")


def train_wordpiece(texts: list[str], *, max_length: int) -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer learnt from ``texts``, wrapped for transformers."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))  # noqa: S106 - a token, not a secret
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    vocabulary = wordpiece.learn_vocabulary(
        tokenizer,
        texts,
        vocab_size=base_models.TINY_BERT_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.model = models.WordPiece(
        vocab={piece: index for index, piece in enumerate(vocabulary)},
        unk_token="[UNK]",  # noqa: S106
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    # transformers leaves this constructor unannotated.
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        unk_token="[UNK]",  # noqa: S106
        pad_token="[PAD]",  # noqa: S106
        cls_token="[CLS]",  # noqa: S106
        sep_token="[SEP]",  # noqa: S106
        mask_token="[MASK]",  # noqa: S106
        model_max_length=max_length,
    )
