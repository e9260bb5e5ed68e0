"""Tiny tenant models for the serving tests: one tiny BERT trained on a banking77 slice,
and tenants derived from it (perturbed heads, a narrower label set), all packed with the
training app's deterministic tar."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.worker.serving.models import PackedModel, narrower, pack, train_tiny, variant
from worker.serving.fleet import RayFleet


@pytest.fixture(scope="session")
def tenant_models(tmp_path_factory: pytest.TempPathFactory) -> list[PackedModel]:
    """Four packed models: the trained one, two perturbed copies, one with 4 labels."""
    root = tmp_path_factory.mktemp("tenants")
    base = train_tiny(root / "train", seed=3, epochs=2)
    dirs = [
        base,
        variant(base, root / "v1", seed=1, noise=0.5),
        variant(base, root / "v2", seed=2, noise=0.5),
        narrower(base, root / "n4", keep=4),
    ]
    return [pack(d, root / f"model-{i}.tar") for i, d in enumerate(dirs)]


@pytest.fixture(scope="module")
def fleet(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayFleet]:
    """A RayFleet of the module's own (a namespace of its own on the session's Ray head);
    its classifier pool is shut down after the module."""
    fleet = RayFleet(
        address=ray_address,
        namespace=f"test-{uuid.uuid4().hex[:6]}",
        local_dir=tmp_path_factory.mktemp("fleet"),
    )
    yield fleet
    fleet.shutdown_pool("classifier")
