"""An autocomplete model on a replica, without Ray (worker.serving.autocomplete): the
artifact loads through the replica's loader; a session's next call reuses its cache and
answers what the prompt alone gets; the sessions' LRU stays within its count and bytes
(and the model's memory counts them); requests decoded together answer each as alone; a
bad frame is refused naming the field."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.worker.serving.autocomplete_models import (
    PackedCompleter,
    completer_of,
)
from worker.serving.autocomplete import (
    AutocompleteModel,
    CompletionRequest,
    completion_request,
    state_bytes,
)
from worker.serving.loading import build_classifier, load_model
from worker.serving.specs import ModelLoadError

PROMPTS = [
    ("Which account", "What is my balance?"),
    ("The bal", "Check my savings."),
    ("Great. Is there", "Thanks."),
    ("Have a", ""),
]


@pytest.fixture
def packed(autocomplete_packed: PackedCompleter) -> PackedCompleter:
    return autocomplete_packed


@pytest.fixture
def served(packed: PackedCompleter) -> AutocompleteModel:
    loaded = load_model(packed.tar.as_uri(), packed.sha256, device="cpu")
    assert isinstance(loaded.classifier, AutocompleteModel)
    return loaded.classifier


def alone(packed: PackedCompleter, prefix: str, context: str = "") -> Any:
    (completion,) = completer_of(packed.model_dir).complete(prefix, context)
    return completion


def test_the_artifact_loads_as_an_autocomplete_model_and_a_broken_one_is_refused(
    packed: PackedCompleter, served: AutocompleteModel, tmp_path: Path
) -> None:
    assert served.model_bytes == (packed.model_dir / "model.safetensors").stat().st_size
    assert served.weight_bytes == served.model_bytes  # no session yet
    assert served.meta["stop"]["end_token"] == "<|end|>"
    for prefix, context in PROMPTS:
        answer = served.complete(CompletionRequest(prefix=prefix, context=context))
        expected = alone(packed, prefix, context)
        assert answer["completions"] == [
            {"text": expected.text, "score": expected.score, "tokens": expected.tokens}
        ]
        assert answer["cached_tokens"] == 0

    def tar_of(files: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()

    files = {p.name: p.read_bytes() for p in packed.model_dir.iterdir()}
    with pytest.raises(ModelLoadError, match=r"lacks tokenizer\.json"):
        build_classifier(tar_of({k: v for k, v in files.items() if k != "tokenizer.json"}),
                         device="cpu")  # fmt: skip
    with pytest.raises(ModelLoadError, match="unreadable autocomplete model"):
        build_classifier(tar_of({**files, "autocomplete.json": b"{}"}), device="cpu")


def test_a_sessions_next_call_reuses_its_cache_and_answers_as_alone(
    packed: PackedCompleter, served: AutocompleteModel
) -> None:
    context = "What is my balance?"
    typed = ["Which", "Which acc", "Which account", "Which account should"]
    cached = []
    for prefix in typed:
        answer = served.complete(CompletionRequest(prefix=prefix, context=context, session="a"))
        cached.append(answer["cached_tokens"])
        assert answer["completions"][0]["text"] == alone(packed, prefix, context).text
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    # The session's cache is counted in the model's memory.
    assert (
        served.weight_bytes
        == served.model_bytes + state_bytes(served.sessions["a"])
        > (served.model_bytes)
    )
    # Another session starts cold; a session-less call never uses one.
    other = served.complete(CompletionRequest(prefix="Which account", context=context,
                                              session="b"))  # fmt: skip
    assert other["cached_tokens"] == 0
    assert (
        served.complete(CompletionRequest(prefix="Which account", context=context))["cached_tokens"]
        == 0
    )


def test_the_sessions_lru_stays_within_its_count_and_bytes(packed: PackedCompleter) -> None:
    from worker.autocomplete import SessionState

    completer = completer_of(packed.model_dir)
    model = AutocompleteModel(completer, weight_bytes=1, session_factory=SessionState,
                              max_sessions=2)  # fmt: skip
    for session in ("a", "b", "a", "c"):  # "a" used again: "b" is the least recent
        model.complete(CompletionRequest(prefix="Which account", session=session))
    assert list(model.sessions) == ["a", "c"]
    one = state_bytes(model.sessions["a"])
    assert one > 0 and model.weight_bytes == 1 + 2 * one
    # A bytes bound of one session's cache keeps only the last one used.
    small = AutocompleteModel(completer, weight_bytes=1, session_factory=SessionState,
                              max_session_bytes=one + one // 2)  # fmt: skip
    for session in ("a", "b", "c"):
        small.complete(CompletionRequest(prefix="Which account", session=session))
    assert list(small.sessions) == ["c"]
    # An evicted session is a cold start next time, never a wrong answer.
    again = small.complete(CompletionRequest(prefix="Which account should", session="a"))
    assert again["cached_tokens"] == 0
    assert again["completions"][0]["text"] == alone(packed, "Which account should").text


def test_requests_decoded_together_answer_each_as_alone(
    packed: PackedCompleter, served: AutocompleteModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    original = served.completer.complete_batch

    def spy(requests: Any, **options: Any) -> Any:
        batches.append(len(requests))
        return original(requests, **options)

    monkeypatch.setattr(served.completer, "complete_batch", spy)
    requests = [
        *(CompletionRequest(prefix=p, context=c) for p, c in PROMPTS),
        CompletionRequest(prefix="Which account", context=PROMPTS[0][1], session="s"),
        CompletionRequest(prefix="Which", n=2, strategy="beam"),
        CompletionRequest(prefix="Have a", max_tokens=3),
    ]
    answers = served.complete_many(requests)
    assert batches == [4]  # the greedy session-less ones with max_tokens 16: one decoding
    for request, answer in zip(requests, answers, strict=True):
        expected = served.complete(CompletionRequest(**{**request.__dict__, "session": ""}))
        assert [c["text"] for c in answer["completions"]] == [
            c["text"] for c in expected["completions"]
        ], request
        assert [c["score"] for c in answer["completions"]] == pytest.approx(
            [c["score"] for c in expected["completions"]], abs=1e-5
        )


@pytest.mark.parametrize(
    ("frame", "said"),
    [
        ({}, "prefix"),
        ({"prefix": "  "}, "prefix must not be empty"),
        ({"prefix": "x" * 2001}, "prefix"),
        ({"prefix": "ok", "max_tokens": 0}, "max_tokens"),
        ({"prefix": "ok", "max_tokens": True}, "max_tokens"),
        ({"prefix": "ok", "n": 99}, "n must"),
        ({"prefix": "ok", "strategy": "nucleus"}, "strategy"),
        ({"prefix": "ok", "top_k": 51}, "top_k"),
        ({"prefix": "ok", "seed": "1"}, "seed"),
        ({"prefix": "ok", "session": "s" * 65}, "session"),
        ({"prefix": "ok", "context": 3}, "context"),
    ],
)
def test_a_bad_frame_is_refused_naming_the_field(frame: dict[str, Any], said: str) -> None:
    with pytest.raises(ValueError, match=said):
        completion_request(frame)


def test_a_frame_takes_the_apis_defaults() -> None:
    assert completion_request({"prefix": "Hi", "op": "complete", "model_id": "m"}) == (
        CompletionRequest(prefix="Hi")
    )
    request = CompletionRequest(prefix="Hi", session="s")
    assert completion_request(request.frame("m")) == request
