"""Small banking77 slices for training tests, uploaded through the API."""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from tests.conftest import BANKING77, Actor


def banking_slice(labels: int = 6, per_label: int = 24, offset: int = 0) -> bytes:
    by_label: dict[str, list[str]] = defaultdict(list)
    with (BANKING77 / "train.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_label[row["category"]].append(row["text"])
    chosen = sorted(by_label)[:labels]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text", "label"])
    for label in chosen:
        for text in by_label[label][offset : offset + per_label]:
            writer.writerow([text, label])
    return out.getvalue().encode()


def make_training_version(
    actor: Actor,
    *,
    name: str = "intents",
    kind: str = "training",
    content: bytes | None = None,
    tenant: str = "acme",
) -> str:
    from django.core.files.uploadedfile import SimpleUploadedFile

    api = f"/api/v1/tenants/{tenant}/datasets/"
    created = actor.api("post", api, {"name": name, "kind": kind})
    assert created.status_code == 201, created.content
    dataset_id = created.json()["id"]
    response = actor.client.post(
        f"{api}{dataset_id}/versions/",
        {"file": SimpleUploadedFile(f"{name}.csv", content or banking_slice())},
    )
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def wait_for(condition: Callable[[], Any], timeout: float = 120.0, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def placeholder_version(
    actor: Actor, tenant: Any, *, sha256: str, labels: tuple[str, ...] = ("a",)
) -> Any:
    """A model version as a run registers it, with placeholder artifact keys: for tests of
    what happens to versions (evaluations, promotions), not of their bytes."""
    from apps.datasets.models import DatasetVersion
    from apps.registry.services import model_version_create
    from apps.training import services as training

    version = DatasetVersion.objects.get(pk=make_training_version(actor))
    run = training.run_launch(actor=actor.user, tenant=tenant, dataset_version=version,
                              base_model="tiny-bert", params={})  # fmt: skip
    return model_version_create(
        run=run, artifact_key="models/x/model.tar", sha256=sha256, size_bytes=1,
        memory_bytes=1, predictions_key="models/x/p.jsonl", labels=list(labels), metrics={},
    )  # fmt: skip
