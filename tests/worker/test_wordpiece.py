"""The tiny BERT's WordPiece vocabulary is learnt deterministically."""

from __future__ import annotations

from worker.training.base import train_wordpiece

TEXTS = [
    "My card has not arrived yet",
    "When will my card arrive?",
    "I lost my card yesterday",
    "How do I top up my account?",
    "Top up failed twice today",
] * 3


def test_same_texts_give_the_same_tokenizer() -> None:
    first, second = train_wordpiece(TEXTS, max_length=16), train_wordpiece(TEXTS, max_length=16)
    assert first.get_vocab() == second.get_vocab()


def test_tokenizer_is_bert_style_and_truncates() -> None:
    tokenizer = train_wordpiece(TEXTS, max_length=8)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("My CARD arrived")["input_ids"])
    assert tokens == ["[CLS]", "my", "card", "arrived", "[SEP]"]
    # An unseen word falls back to known pieces rather than [UNK].
    assert "[UNK]" not in tokenizer.tokenize("cardy")
    long = tokenizer("my card " * 20, truncation=True, max_length=tokenizer.model_max_length)
    assert len(long["input_ids"]) == 8
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == 0
