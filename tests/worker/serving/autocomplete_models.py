"""A tiny autocomplete model for the serving tests (no Django): a 2-layer GPT-2 that
memorised a handful of replies, so what it should complete is known, packed with the
training app's deterministic tar; seeded, so it is the same model in every process."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps.training.packaging import pack_dir

# (context, reply): each reply starts differently, so its first words say which it is.
REPLIES = [
    ("I want to send money.", "Your transfer to Maria is successful."),
    ("What is my balance?", "Which account should I check for you?"),
    ("Thanks.", "Great. Is there anything else I can help with?"),
    ("Check my savings.", "The balance of your savings account is $1,204.50 today."),
    ("Send it to Bob.", "Alright, which account would you like to use?"),
    ("", "Have a wonderful day!"),
]


@dataclass(frozen=True)
class PackedCompleter:
    model_dir: Path
    tar: Path
    sha256: str
    size: int


def train_tiny(directory: Path, *, seed: int = 0, steps: int = 80) -> Path:
    """A 2-layer GPT-2 (64 wide) trained ``steps`` full-batch steps on :data:`REPLIES`,
    written as an autocomplete model directory. On one torch thread: on the shared
    2-core machine torch's default threads made it 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(directory, seed, steps)
    finally:
        torch.set_num_threads(threads)
    return directory


def _train(directory: Path, seed: int, steps: int) -> None:
    import torch

    from worker import autocomplete as ac

    texts = [c for c, _ in REPLIES] + [r for _, r in REPLIES]
    tokenizer = ac.train_tokenizer(texts * 2, vocab_size=300)
    meta = ac.new_meta(tokenizer, max_length=64)
    torch.manual_seed(seed)
    config = ac.gpt2_config(
        tokenizer.get_vocab_size(), n_layer=2, n_embd=64, n_head=2, n_positions=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = ac.build_model(config)
    encoded = [ac.encode_reply(tokenizer, r, c, meta=meta) for c, r in REPLIES]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded])
    lengths = torch.tensor([len(ids) for ids, _ in encoded])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ac.write_completer_dir(directory, model, tokenizer, meta)


def tiny_autocomplete(directory: Path, *, seed: int = 0, steps: int = 80) -> PackedCompleter:
    """:func:`train_tiny`'s model, packed as a training run packs it."""
    model_dir = train_tiny(directory / "model", seed=seed, steps=steps)
    tar = directory / "model.tar"
    sha256, size = pack_dir(model_dir, tar)
    return PackedCompleter(model_dir=model_dir, tar=tar, sha256=sha256, size=size)


@functools.cache
def completer_of(model_dir: Path) -> Any:
    """The model in-process, as the evaluation and the benchmarks load it."""
    from worker.autocomplete import load_completer

    return load_completer(model_dir)
