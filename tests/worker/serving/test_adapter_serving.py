"""Adapters on real Ray replicas (the session's ``ray_address`` head): one base held once
per replica and many tenants' adapters on it, concurrent requests of every tenant answered
as each tenant's own model alone answers, an adapter for other base weights refused alone,
and the replica's statistics showing the base and its adapters."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from tests.worker.serving.models import PackedModel, adapter_variant, pack, train_adapter
from tests.worker.serving.test_fleet import TEXTS, wait_for
from worker import adapters, base_models
from worker.inference import load_classifier
from worker.serving.fleet import RayFleet
from worker.serving.specs import ModelLoadError, ModelSpec, PoolSpec

KIND = "classifier"
TENANTS = 12
# One set of 200 MB: the 87 MB base once plus twelve adapters fit; a copy of the base per
# tenant would need over a gigabyte.
POOL = PoolSpec(kind=KIND, replica_memory_bytes=200_000_000, max_sets=1, max_replicas=1)


@pytest.fixture(scope="module")
def adapter_models(tmp_path_factory: pytest.TempPathFactory) -> list[PackedModel]:
    root = tmp_path_factory.mktemp("adapters")
    trained = train_adapter(root / "train", seed=11)
    dirs = [trained] + [
        adapter_variant(trained, root / f"tenant-{i}", seed=i, rank=2 + i % 3)
        for i in range(1, TENANTS)
    ]
    return [pack(d, root / f"adapter-{i}.tar") for i, d in enumerate(dirs)]


def adapter_spec(packed: PackedModel, model_id: str) -> ModelSpec:
    return ModelSpec(
        model_id=model_id,
        artifact_uri=packed.tar.as_uri(),
        sha256=packed.sha256,
        memory_bytes=adapters.adapter_bytes(packed.model_dir),
        base_sha256=base_models.minilm_sha256(),
        base_memory_bytes=adapters.base_memory_bytes("minilm-l6-lora"),
    )


def test_one_replica_holds_the_base_once_and_serves_every_tenant_as_alone(
    fleet: RayFleet, adapter_models: list[PackedModel]
) -> None:
    specs = [adapter_spec(m, f"ad-{i}") for i, m in enumerate(adapter_models)]
    placement = fleet.apply(POOL, specs)
    assert set(placement.assignment.values()) == {0}  # one set: the base counted once
    base_bytes = specs[0].base_memory_bytes
    assert placement.used_bytes[0] == base_bytes + sum(s.memory_bytes for s in specs)
    ids = [s.model_id for s in specs]
    assert fleet.wait_ready(KIND, ids, timeout_s=180) == dict.fromkeys(ids)

    # Every tenant at once: the replica batches requests of different tenants together.
    def ask(position: int) -> list[dict[str, object]]:
        texts = TEXTS[position % len(TEXTS) :] + TEXTS[: position % len(TEXTS)]
        return [dict(o) for o in fleet.predict(KIND, ids[position], texts).outputs]

    with concurrent.futures.ThreadPoolExecutor(max_workers=TENANTS) as pool:
        served = list(pool.map(ask, range(TENANTS)))
    for position, (packed, outputs) in enumerate(zip(adapter_models, served, strict=True)):
        texts = TEXTS[position % len(TEXTS) :] + TEXTS[: position % len(TEXTS)]
        alone = load_classifier(packed.model_dir, device="cpu").predict(texts)
        assert [o["label"] for o in outputs] == [p["label"] for p in alone]
        assert [o["score"] for o in outputs] == pytest.approx([p["score"] for p in alone], abs=1e-5)

    def replica() -> dict[str, object] | None:
        (pool_status,) = [p for p in fleet.status()["pools"] if p["kind"] == KIND]
        (only,) = pool_status["sets"][0]["replicas"]
        served_all = sum(1 for m in only["models"] if m["requests"]) == TENANTS
        return only if served_all else None

    stats = wait_for(replica)
    (base,) = stats["bases"]
    assert base["sha256"] == base_models.minilm_sha256()
    assert base["adapters"] == TENANTS
    assert base["memory_bytes"] > 80_000_000
    models = stats["models"]
    assert {m["format"] for m in models} == {"adapter"}
    own = sum(m["memory_bytes"] for m in models)
    assert all(m["memory_bytes"] < 500_000 for m in models)
    assert stats["memory_used_bytes"] == own + base["memory_bytes"]


def test_an_adapter_for_other_base_weights_is_refused_alone(
    fleet: RayFleet, adapter_models: list[PackedModel], tmp_path: Path
) -> None:
    stranger = adapter_variant(
        adapter_models[0].model_dir, tmp_path / "stranger", seed=99, base_sha256="f" * 64
    )
    packed = pack(stranger, tmp_path / "stranger.tar")
    good = adapter_spec(adapter_models[0], "ad-0")
    bad = adapter_spec(packed, "ad-stranger")
    fleet.apply(POOL, [good, bad])
    ready = fleet.wait_ready(KIND, ["ad-0", "ad-stranger"], timeout_s=120)
    assert ready["ad-0"] is None
    assert "this host holds minilm-l6-lora" in str(ready["ad-stranger"])
    with pytest.raises(ModelLoadError, match=r"base weights sha256 f{8}"):
        fleet.predict(KIND, "ad-stranger", TEXTS)
    assert fleet.predict(KIND, "ad-0", TEXTS).outputs
