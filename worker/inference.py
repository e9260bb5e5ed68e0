"""Loading a trained classifier and predicting with it, batched, in eval mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import torch

from worker.modeling import collate, encode, load_model_dir


class Prediction(TypedDict):
    label: str
    score: float


class Classifier:
    """A loaded model directory: ``predict`` texts to their most likely label."""

    def __init__(self, model_dir: Path, *, device: str | None = None) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer, self.labels = load_model_dir(model_dir, device=self.device)
        self.model.train(False)  # eval mode: no dropout
        self.max_length = int(self.tokenizer.model_max_length)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

    @torch.no_grad()
    def predict(self, texts: list[str], *, batch_size: int = 32) -> list[Prediction]:
        predictions: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            ids = encode(self.tokenizer, texts[start : start + batch_size], self.max_length)
            batch = {k: v.to(self.device) for k, v in collate(ids, self.pad_token_id).items()}
            logits = self.model(**batch).logits.float()
            scores, indices = torch.softmax(logits, dim=-1).max(dim=-1)
            predictions += [
                Prediction(label=self.labels[index], score=score)
                for index, score in zip(indices.tolist(), scores.tolist(), strict=True)
            ]
        return predictions


def load_classifier(model_dir: Path, *, device: str | None = None) -> Any:
    """The classifier saved in ``model_dir`` (CUDA when available unless ``device`` says):
    a :class:`Classifier`, or for an adapter directory a
    :class:`worker.adapters.AdapterModel` on this process's shared base, the very code
    that serves it, so evaluation and warm-up predict alike."""
    from worker import adapters

    if adapters.is_adapter_dir(model_dir):
        chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return adapters.load_adapter_model(model_dir, device=chosen)
    return Classifier(model_dir, device=device)
