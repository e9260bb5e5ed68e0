"""A replica's configuration: what it is told of each model, and the digest that says which
configuration it runs."""

from __future__ import annotations

from dataclasses import replace

from worker.serving.placement import spec_bases
from worker.serving.routing import replica_config
from worker.serving.specs import ModelSpec, PoolSpec

ADAPTER = ModelSpec(
    model_id="v1",
    artifact_uri="file:///tmp/v1.tar",
    sha256="a" * 64,
    memory_bytes=400_000,
    base_sha256="b" * 64,
    base_memory_bytes=90_000_000,
)
FULL = ModelSpec(
    model_id="v2", artifact_uri="file:///tmp/v2.tar", sha256="c" * 64, memory_bytes=90_000_000
)


def config(*models: ModelSpec) -> dict[str, object]:
    return dict(replica_config(PoolSpec(), role="set", index=0, models=models, budget_bytes=1))


def test_entries_carry_the_shared_base_and_a_full_model_none() -> None:
    adapter, full = config(FULL, ADAPTER)["models"]  # type: ignore[misc]
    assert (adapter["base_sha256"], adapter["base_memory_bytes"]) == ("b" * 64, 90_000_000)
    assert (full["base_sha256"], full["base_memory_bytes"]) == ("", 0)


def test_the_version_changes_with_the_base() -> None:
    versions = {
        config(spec)["version"]
        for spec in (
            ADAPTER,
            replace(ADAPTER, base_sha256="d" * 64),
            replace(ADAPTER, base_memory_bytes=91_000_000),
        )
    }
    assert len(versions) == 3
    assert config(ADAPTER)["version"] == config(replace(ADAPTER))["version"]


def test_spec_bases_key_adapters_by_base_sha256_at_the_largest_size_stated() -> None:
    other = replace(ADAPTER, model_id="v3", base_memory_bytes=95_000_000)
    assert spec_bases([ADAPTER, FULL, other]) == (
        {"v1": "b" * 64, "v3": "b" * 64},
        {"b" * 64: 95_000_000},
    )
