"""MLflow bookkeeping for training runs: one MLflow run per training run, resumed with it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.conf import settings


class Tracking:
    """Thin wrapper over ``MlflowClient`` so the runner reads as the steps it takes."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri or settings.MLFLOW_TRACKING_URI)
        self.run_id = ""

    def _experiment(self, tenant_slug: str) -> str:
        name = f"workbench/{tenant_slug}"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        root = settings.MLFLOW_ARTIFACT_ROOT.rstrip("/")
        location = (
            f"{root}/{tenant_slug}" if not settings.MLFLOW_TRACKING_URI.startswith("http") else None
        )
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except Exception:  # created by a concurrent worker in the meantime
            again = self.client.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again.experiment_id)

    def start(
        self,
        *,
        existing_run_id: str,
        tenant_slug: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
    ) -> str:
        if existing_run_id:
            self.run_id = existing_run_id
            self.client.update_run(existing_run_id, status="RUNNING")
            return self.run_id
        experiment_id = self._experiment(tenant_slug)
        created = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = str(created.info.run_id)
        from mlflow.entities import Param

        self.client.log_batch(
            self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        )
        return self.run_id

    def log_metrics(self, points: list[dict[str, Any]]) -> None:
        if not self.run_id or not points:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(p["name"], float(p["value"]), now, int(p["step"])) for p in points]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_model(self, model_dir: Path, registered_name: str, *, artifact_path: str) -> str:
        """Log the model files as the run's artifact and register them; returns the version.

        ``artifact_path`` is per attempt: the MLflow run is shared by every attempt of the
        training run, and a superseded one must not overwrite the files a version names.
        """
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(self.run_id, str(model_dir), artifact_path=artifact_path)
        try:
            self.client.create_registered_model(registered_name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(
                exc
            ):
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(registered_name, source, run_id=self.run_id)
        return str(version.version)

    def delete_model_version(self, registered_name: str, version: str) -> None:
        self.client.delete_model_version(registered_name, version)

    def end(self, status: str) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def mlflow_run_url(mlflow_run_id: str) -> str:
    if not settings.MLFLOW_UI_URL or not mlflow_run_id:
        return ""
    return f"{settings.MLFLOW_UI_URL.rstrip('/')}/#/runs/{mlflow_run_id}"
