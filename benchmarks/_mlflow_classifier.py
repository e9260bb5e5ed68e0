"""The reference for the serving memory benchmark: one tenant classifier as an MLflow
pyfunc model, served alone by ``mlflow models serve`` (one process per model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc


class ClassifierModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """``worker.inference.Classifier`` behind MLflow's scoring server."""

    def load_context(self, context: Any) -> None:
        from worker.inference import load_classifier

        self.classifier = load_classifier(Path(context.artifacts["model_dir"]))

    def predict(self, context: Any, model_input: Any, params: Any = None) -> list[str]:
        texts = [str(text) for text in model_input["text"]]
        return [p["label"] for p in self.classifier.predict(texts)]


def save(model_dir: Path, target: Path) -> Path:
    mlflow.pyfunc.save_model(
        path=str(target),
        python_model=ClassifierModel(),
        artifacts={"model_dir": str(model_dir)},
    )
    return target
