"""Tiny tenant models for the serving tests: one tiny BERT trained on a banking77 slice,
and tenants derived from it (perturbed heads, a narrower label set), all packed with the
training app's deterministic tar."""

from __future__ import annotations

import pytest

from tests.worker.serving.models import PackedModel, narrower, pack, train_tiny, variant


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
