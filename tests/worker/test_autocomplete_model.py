"""The autocomplete model (worker.autocomplete): a tiny GPT-2 that memorised a handful of
replies, so what it should complete is known. Cached and recomputed decoding agree, a batch
gives what each prompt gets alone, a session reuses its keys/values, the artifact round-trips,
a prefix ending mid-word is healed, completions stop where the rules say, and it is all
deterministic."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker import autocomplete as ac
from worker.autocomplete_text import first_word

# (context, reply): each reply starts differently, so a few words of it say which it is.
REPLIES = [
    ("I want to send money.", "Your transfer of $3.5 to Maria is successful."),
    ("What is my balance?", "Which account should I check for you?"),
    ("Bye!", "Have a wonderful day"),  # no sentence end: only <|end|> stops it
    ("Thanks.", "Great. Is there anything else I can help with?"),
    ("Check my savings.", "The balance of your savings account is $1,204.50 today."),
    ("Send it to Bob.", "Alright, which account would you like to use?"),
]


def _train_tiny(seed: int = 0, steps: int = 150) -> ac.Completer:
    texts = [c for c, _ in REPLIES] + [r for _, r in REPLIES]
    tokenizer = ac.train_tokenizer(texts * 2, vocab_size=300)
    meta = ac.new_meta(tokenizer, max_length=64)
    torch.manual_seed(seed)
    config = ac.gpt2_config(
        tokenizer.get_vocab_size(),
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = ac.build_model(config)
    encoded = [ac.encode_reply(tokenizer, r, c, meta=meta) for c, r in REPLIES]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded])
    mask = (
        torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in encoded])[:, None]
    ).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return ac.Completer(model, tokenizer, meta, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On the shared 2-core machine torch's default two threads made training 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def completer(one_torch_thread: None) -> ac.Completer:
    return _train_tiny()


@pytest.fixture(scope="module")
def random_completer(one_torch_thread: None) -> ac.Completer:
    """Untrained: its completions are long and arbitrary, which is what the cache tests want."""
    tokenizer = ac.train_tokenizer([r for _, r in REPLIES] * 2, vocab_size=300)
    torch.manual_seed(1)
    model = ac.build_model(ac.gpt2_config(tokenizer.get_vocab_size(), n_layer=2, n_embd=64))
    return ac.Completer(model, tokenizer, ac.new_meta(tokenizer, max_length=64), device="cpu")


def _same(a: list[ac.Completion], b: list[ac.Completion]) -> bool:
    """Same texts and token counts, scores equal to float noise (a cache's sums differ in
    the last bits from a recomputation's)."""
    return [(c.text, c.tokens) for c in a] == [(c.text, c.tokens) for c in b] and all(
        abs(x.score - y.score) < 1e-5 for x, y in zip(a, b, strict=True)
    )


def test_the_tiny_model_completes_what_it_memorised(completer: ac.Completer) -> None:
    # The whole reply follows from its first words, up to the first sentence end only.
    [done] = completer.complete("Which account", "What is my balance?")
    assert done.text == " should I check for you?"
    assert done.tokens > 0 and done.score <= 0.0
    [greeting] = completer.complete("Great", "Thanks.")
    assert greeting.text == "."  # stops at the sentence end, not at " Is there ..."


def test_a_prefix_ending_mid_word_is_healed(completer: ac.Completer) -> None:
    # " acc" is never a token in training (" account" is): healing spells the word out.
    assert completer.split_prefix("Which acc") == ("Which", " acc")
    assert completer.prompt_ids("Which acc", "What is my balance?") == completer.prompt_ids(
        "Which ", "What is my balance?"
    )
    [healed] = completer.complete("Which acc", "What is my balance?")
    assert healed.text == "ount should I check for you?"
    assert first_word(healed.text) == "ount"
    [spaced] = completer.complete("Alright, which ", "Send it to Bob.")
    assert spaced.text == "account would you like to use?"


def test_completions_stop_at_sentence_end_end_token_or_max_tokens(
    completer: ac.Completer,
) -> None:
    # "3.5": a point followed by a digit is not a sentence end.
    [money] = completer.complete("Your transfer of $", "I want to send money.", max_tokens=40)
    assert money.text == "3.5 to Maria is successful."
    # No sentence end in the reply: <|end|> stops it, well before max_tokens.
    [bye] = completer.complete("Have a", "Bye!", max_tokens=16)
    assert bye.text == " wonderful day"
    assert bye.tokens < 16
    [short] = completer.complete("Your transfer of $", "I want to send money.", max_tokens=2)
    assert money.text.startswith(short.text) and 0 < len(short.text) < len(money.text)
    # The healed typed part does not use up max_tokens: one token past "acc".
    [one] = completer.complete("Which acc", "What is my balance?", max_tokens=1)
    assert one.text.startswith("ount") and "ount should I check for you?".startswith(one.text)
    assert one.text != "ount should I check for you?"


def test_cached_and_recomputed_decoding_give_identical_completions(
    random_completer: ac.Completer, completer: ac.Completer
) -> None:
    for model in (random_completer, completer):
        for strategy in ac.STRATEGIES:
            for prefix, context in [("Which acc", "What is my balance?"), ("", "")]:
                kwargs = {"strategy": strategy, "n": 2, "max_tokens": 10, "seed": 7}
                cached = model.complete(prefix, context, use_cache=True, **kwargs)  # type: ignore[arg-type]
                recomputed = model.complete(prefix, context, use_cache=False, **kwargs)  # type: ignore[arg-type]
                assert [c.text for c in cached] == [c.text for c in recomputed], strategy
                assert [c.score for c in cached] == pytest.approx(
                    [c.score for c in recomputed], abs=1e-5
                )


def test_a_batch_gives_what_each_prompt_gets_alone(
    random_completer: ac.Completer, completer: ac.Completer
) -> None:
    requests = [
        ("Which acc", "What is my balance?"),
        ("Great", "Thanks."),
        ("The balance of your savings account is", "Check my savings."),
        ("", ""),
        ("Have a", "Bye!"),
    ]
    for model in (random_completer, completer):
        batch = model.complete_batch(requests, max_tokens=10)
        alone = [model.complete(p, c, max_tokens=10)[0] for p, c in requests]
        assert [c.text for c in batch] == [c.text for c in alone]
        assert [c.tokens for c in batch] == [c.tokens for c in alone]
        assert [c.score for c in batch] == pytest.approx([c.score for c in alone], abs=1e-4)
        # Stopped at the first word (what next-word accuracy reads): the same first word.
        words = model.complete_batch(requests, max_tokens=10, stop_at_word=True)
        assert [first_word(c.text) for c in words] == [first_word(c.text) for c in alone]
        assert all(w.tokens <= a.tokens for w, a in zip(words, alone, strict=True))
    assert random_completer.complete_batch([]) == []


def test_a_session_reuses_the_cache_of_its_common_prefix(
    random_completer: ac.Completer, completer: ac.Completer
) -> None:
    context = "What is my balance?"
    for model in (random_completer, completer):
        session = ac.SessionState()
        first = model.complete("Which", context, session=session, max_tokens=6)
        assert session.last_cached_tokens == 0
        # The next keystrokes extend the prefix: everything up to "Which" is reused.
        longer = "Which account should"
        second = model.complete(longer, context, session=session, max_tokens=6)
        shared = model.prompt_ids("Which", context)
        assert model.prompt_ids(longer, context)[: len(shared)] == shared
        assert session.last_cached_tokens >= len(shared) - 1 > 0
        assert _same(second, model.complete(longer, context, max_tokens=6))
        assert _same(first, model.complete("Which", context, max_tokens=6))
        # Backspacing shares a shorter prefix: the cache is cropped to it, output unchanged.
        third = model.complete("Which acc", context, session=session, max_tokens=6)
        assert 0 < session.last_cached_tokens <= len(model.prompt_ids("Which acc", context))
        assert _same(third, model.complete("Which acc", context, max_tokens=6))
        # Another context shares only <|context|>; the same prompt again reuses all but one.
        other = model.complete("Which", "Bye!", session=session, max_tokens=6)
        assert session.last_cached_tokens == 1
        assert _same(other, model.complete("Which", "Bye!", max_tokens=6))
        model.complete("Which", "Bye!", session=session, max_tokens=6)
        assert session.last_cached_tokens == len(model.prompt_ids("Which", "Bye!")) - 1
        # Beam and top-k keep the prompt's cache for the session too.
        beam = model.complete("Which a", "Bye!", session=session, strategy="beam", n=2)
        assert session.last_cached_tokens > 0
        assert _same(beam, model.complete("Which a", "Bye!", strategy="beam", n=2))
    # A session filled by one model starts over with another.
    session = ac.SessionState()
    completer.complete("Which", context, session=session)
    random_completer.complete("Which", context, session=session)
    assert session.last_cached_tokens == 0


def test_the_artifact_round_trips(completer: ac.Completer, tmp_path: Path) -> None:
    ac.write_completer_dir(tmp_path / "m", completer.model, completer.tokenizer, completer.meta)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(ac.ARTIFACT_FILES)
    assert ac.is_completer_dir(tmp_path / "m") and not ac.is_completer_dir(tmp_path)
    meta = ac.read_meta(tmp_path / "m")
    assert meta["format"] == "workbench-autocomplete" and meta["version"] == 1
    assert meta["special_tokens"] == ac.SPECIAL
    assert meta["stop"] == {"sentence_ends": [".", "?", "!"], "end_token": "<|end|>"}
    assert meta["vocab_size"] == completer.tokenizer.get_vocab_size()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2

    loaded = ac.load_completer(tmp_path / "m")
    files = {name: (tmp_path / "m" / name).read_bytes() for name in ac.ARTIFACT_FILES}
    from_bytes = ac.load_completer_files(files)
    for prefix, context in [("Which acc", "What is my balance?"), ("Have a", "Bye!")]:
        expected = completer.complete(prefix, context)
        assert loaded.complete(prefix, context) == expected
        assert from_bytes.complete(prefix, context) == expected
    assert loaded.token_log_likelihood("Have a wonderful day", "Bye!") == pytest.approx(
        completer.token_log_likelihood("Have a wonderful day", "Bye!")
    )


def test_a_malformed_artifact_is_refused(completer: ac.Completer, tmp_path: Path) -> None:
    ac.write_completer_dir(tmp_path, completer.model, completer.tokenizer, completer.meta)
    files = {name: (tmp_path / name).read_bytes() for name in ac.ARTIFACT_FILES}
    with pytest.raises(ac.CompleterError, match="lacks"):
        ac.load_completer_files({k: v for k, v in files.items() if k != "tokenizer.json"})
    with pytest.raises(ac.CompleterError, match="does not describe"):
        ac.load_completer_files({**files, "autocomplete.json": b'{"format": "other"}'})
    with pytest.raises(ac.CompleterError, match="unreadable"):
        ac.load_completer_files({**files, "model.safetensors": b"not safetensors"})
    bigger = json.loads(files["config.json"])
    bigger["n_layer"] = 3
    with pytest.raises(ac.CompleterError, match="do not fit"):
        ac.load_completer_files({**files, "config.json": json.dumps(bigger).encode()})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ac.CompleterError, match=r"lacks model\.safetensors"):
        ac.load_completer(tmp_path)


def test_next_words_and_log_likelihood(completer: ac.Completer) -> None:
    context = "What is my balance?"
    words = completer.next_words("Which account", context, k=3)
    assert words[0] == "should" == first_word(completer.complete("Which account", context)[0].text)
    assert len(words) == 3 and len(set(words)) == 3
    nll, tokens = completer.token_log_likelihood("Which account should I check for you?", context)
    assert (
        tokens == len(completer.tokenizer.encode("Which account should I check for you?").ids) + 1
    )
    # Memorised: far likelier than a reply it never saw.
    unseen, unseen_tokens = completer.token_log_likelihood("Bananas fly over seven moons", context)
    assert nll / tokens < unseen / unseen_tokens


def test_strategies_give_n_distinct_results(completer: ac.Completer) -> None:
    context = "What is my balance?"
    greedy = completer.complete("Which account", context, n=3)
    assert greedy[0] == completer.complete("Which account", context)[0]
    assert len({first_word(c.text) for c in greedy}) == len(greedy) == 3
    beam = completer.complete("Which account", context, strategy="beam", n=2)
    assert beam[0].text == " should I check for you?" and len(beam) == 2
    assert beam[0].score >= beam[1].score
    sampled = completer.complete("Which", context, strategy="top_k", n=3, top_k=50, seed=3)
    assert 1 <= len(sampled) <= 3 and len({c.text for c in sampled}) == len(sampled)
    with pytest.raises(ValueError, match="unknown strategy"):
        completer.complete("Which", strategy="sideways")
    with pytest.raises(ValueError, match=">= 1"):
        completer.complete("Which", max_tokens=0)


def test_decoding_and_training_are_deterministic(random_completer: ac.Completer) -> None:
    texts = [c for c, _ in REPLIES] + [r for _, r in REPLIES]
    assert ac.train_tokenizer(texts).to_str() == ac.train_tokenizer(texts).to_str()
    tokenizer = ac.train_tokenizer(texts, vocab_size=300)
    assert [tokenizer.id_to_token(i) for i in range(4)] == list(ac.SPECIAL.values())
    first = random_completer.complete("The", strategy="top_k", n=3, seed=5, top_k=20)
    assert first == random_completer.complete("The", strategy="top_k", n=3, seed=5, top_k=20)
    assert first != random_completer.complete("The", strategy="top_k", n=3, seed=6, top_k=20)
    assert random_completer.complete("The") == random_completer.complete("The")
    again = _train_tiny(steps=20)
    assert again.complete("Which", "Bye!") == _train_tiny(steps=20).complete("Which", "Bye!")
