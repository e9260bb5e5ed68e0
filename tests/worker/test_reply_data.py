"""worker.reply_data: a text-generation version's file as Reply rows, without Django."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.reply_data import Reply, read_replies, read_reply_file, split_replies
from worker.training.config import DataSpec
from worker.training.data import DataError

SGD_BANKS = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "sgd-replies" / "banks_1"


def test_a_version_with_a_context_column_reads_each_reply_with_its_message(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v.csv"
    path.write_text(
        'msg,reply\nHi there.,"Hello, how can I help?"\n  ,Anything else?\n"Two\nlines",Sure.\n',
        encoding="utf-8",
    )
    spec = DataSpec(path=path, text_column="reply", label_column="msg", format="csv")
    assert read_replies(spec) == [
        Reply("Hello, how can I help?", "Hi there."),
        Reply("Anything else?", ""),
        Reply("Sure.", "Two\nlines"),
    ]


def test_a_version_without_a_context_column_reads_no_context(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text(
        json.dumps({"text": "Okay.", "context": "ignored: the version names none"})
        + "\n\n"
        + json.dumps({"text": "Done!"})
        + "\n",
        encoding="utf-8",
    )
    spec = DataSpec(path=path, text_column="text", label_column="", format="jsonl")
    assert read_replies(spec) == [Reply("Okay."), Reply("Done!")]


def test_a_jsonl_null_context_is_no_context_and_a_blank_reply_names_its_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text(
        json.dumps({"text": "Yes.", "context": None})
        + "\n"
        + json.dumps({"text": "No context field."})
        + "\n"
        + json.dumps({"text": " "})
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match="line 3: the reply is empty"):
        read_reply_file(path, "jsonl")
    path.write_text(json.dumps({"text": "Yes.", "context": None}) + "\n", encoding="utf-8")
    assert read_reply_file(path, "jsonl") == [Reply("Yes.", "")]


def test_a_named_context_column_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "v.csv"
    path.write_text("text\nHello.\n", encoding="utf-8")
    assert read_reply_file(path) == [Reply("Hello.")]  # None: "context" only when present
    with pytest.raises(DataError, match="no context column 'message'"):
        read_reply_file(path, context_column="message")


def test_the_shared_sgd_corpus_reads_with_its_contexts() -> None:
    if not SGD_BANKS.exists():
        pytest.skip("../shared/datasets/sgd-replies is not here")
    replies = read_reply_file(SGD_BANKS / "train.csv")
    assert len(replies) > 1000
    assert replies[0] == Reply(
        "Great, who would you like to send the money to?", "I would like to transfer some money."
    )


def test_the_split_holds_out_whole_reply_texts_deterministically() -> None:
    replies = [Reply(f"reply {i % 7}", f"ctx {i}") for i in range(40)]
    train, validation = split_replies(replies, 0.3, seed=1)
    assert (train, validation) == split_replies(replies, 0.3, seed=1)
    assert {r.text for r in train}.isdisjoint({r.text for r in validation})
    assert len({r.text for r in validation}) == 2 and len(train) + len(validation) == 40
    with pytest.raises(DataError, match="too few distinct"):
        split_replies([Reply("same"), Reply("same")], 0.5, seed=0)
