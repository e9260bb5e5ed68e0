"""The reference server's model for benchmarks/predict_latency.py: a pyfunc around
``worker.inference.Classifier``, so ``mlflow models serve`` runs the same forward pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc


class ClassifierModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    def load_context(self, context: Any) -> None:
        from worker.inference import load_classifier

        self.classifier = load_classifier(Path(context.artifacts["model_dir"]), device="cpu")

    def predict(self, context: Any, model_input: Any, params: Any = None) -> list[str]:
        if hasattr(model_input, "iloc"):  # a DataFrame: its first column holds the texts
            texts = [str(t) for t in model_input.iloc[:, 0]]
        else:
            texts = [str(t) for t in model_input]
        return [p["label"] for p in self.classifier.predict(texts)]
