"""RayFleet on a real local Ray (the session's ``ray_address`` head): placement applied as
configuration, predictions equal to the reference classifier, unloads without restarts,
refused capacity leaving the old version serving, a killed replica coming back."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.worker.serving.models import PackedModel
from worker.inference import load_classifier
from worker.serving.fleet import DIRECT_REFRESH_S, RayFleet
from worker.serving.specs import InsufficientCapacity, ModelLoadError, ModelSpec, PoolSpec

TEXTS = [
    "I lost my phone, what do I do?",
    "What exchange rate do you use for euros?",
    "How old do you have to be to open an account?",
    "I want to close my account",
]
KIND = "classifier"
# Two pinned models per set (budget 25 MB, 10 MB each), so three pinned models need two sets.
POOL = PoolSpec(kind=KIND, replica_memory_bytes=25_000_000, max_sets=2, max_replicas=1)


def specs_for(models: list[PackedModel]) -> list[ModelSpec]:
    return [m.spec(f"mv-{i}", memory_bytes=10_000_000) for i, m in enumerate(models)]


def apply_three(fleet: RayFleet, tenant_models: list[PackedModel]) -> dict[str, int]:
    """Deploy mv-0 and mv-1 (set 0) and mv-2 (set 1); wait until all are loaded."""
    previous = fleet.apply(POOL, specs_for(tenant_models[:3])).assignment
    assert fleet.wait_ready(KIND, list(previous), timeout_s=120) == dict.fromkeys(previous)
    return previous


def pool_status(fleet: RayFleet) -> dict[str, Any]:
    (pool,) = [p for p in fleet.status()["pools"] if p["kind"] == KIND]
    return pool


def replicas_by_set(fleet: RayFleet) -> dict[str, list[dict[str, Any]]]:
    return {s["name"]: s["replicas"] for s in pool_status(fleet)["sets"]}


def wait_for(condition: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.5)


def test_apply_serves_each_model_as_the_reference_classifier_does(
    fleet: RayFleet, tenant_models: list[PackedModel]
) -> None:
    specs = specs_for(tenant_models[:3])
    placement = fleet.apply(POOL, specs)
    assert placement.assignment == {"mv-0": 0, "mv-1": 0, "mv-2": 1}
    assert fleet.wait_ready(KIND, [s.model_id for s in specs], timeout_s=120) == {
        "mv-0": None,
        "mv-1": None,
        "mv-2": None,
    }
    for spec, packed in zip(specs, tenant_models, strict=False):
        result = fleet.predict(KIND, spec.model_id, TEXTS)
        reference = load_classifier(packed.model_dir, device="cpu").predict(TEXTS)
        assert [o["label"] for o in result.outputs] == [p["label"] for p in reference]
        for mine, theirs in zip(result.outputs, reference, strict=True):
            assert mine["score"] == pytest.approx(theirs["score"], rel=1e-5)
        assert result.latency_ms > 0 and result.replica_id
    with pytest.raises(KeyError):
        fleet.predict(KIND, "mv-unknown", TEXTS)

    pool = wait_for(lambda: _with_requests(pool_status(fleet), {"mv-0", "mv-1", "mv-2"}))
    assert [s["name"] for s in pool["sets"]] == ["classifier-set-0", "classifier-set-1"]
    first = pool["sets"][0]
    assert (first["index"], first["budget_bytes"]) == (0, 25_000_000)
    assert (first["min_replicas"], first["max_replicas"]) == (1, 1)
    assert first["models"] == ["mv-0", "mv-1"]
    (replica,) = first["replicas"]
    assert replica["replica_id"] and replica["started_at"] < time.time()
    models = {m["model_id"]: m for m in replica["models"]}
    assert set(models) == {"mv-0", "mv-1"}
    for model in models.values():
        assert model["loaded"] and model["pinned"] and model["error"] is None
        assert model["memory_bytes"] > 100_000 and model["load_ms"] > 0
        assert model["requests"] == 1 and model["hits"] == 1 and model["errors"] == 0
        assert 0 < model["latency_ms_p50"] <= model["latency_ms_p99"]
    assert replica["memory_used_bytes"] == sum(m["memory_bytes"] for m in models.values())
    assert replica["socket_requests"] == 2  # both predicts came through the replica's socket
    assert pool["tail"]["name"] == "classifier-tail"


def _with_requests(pool: dict[str, Any], model_ids: set[str]) -> dict[str, Any] | None:
    """The pool status once every replica has published its requests for ``model_ids``."""
    seen = {
        m["model_id"]
        for s in pool["sets"]
        for r in s["replicas"]
        for m in r["models"]
        if m["requests"] > 0
    }
    return pool if model_ids <= seen else None


def test_reapply_without_a_model_unloads_it_in_the_same_replica(
    fleet: RayFleet, tenant_models: list[PackedModel]
) -> None:
    specs = specs_for(tenant_models[:3])
    previous = apply_three(fleet, tenant_models)
    before = replicas_by_set(fleet)["classifier-set-0"][0]["replica_id"]

    placement = fleet.apply(POOL, [specs[0], specs[2]], previous=previous)
    assert placement.assignment == {"mv-0": 0, "mv-2": 1}
    assert placement.moved == []

    def unloaded() -> dict[str, Any] | None:
        (replica,) = replicas_by_set(fleet)["classifier-set-0"]
        return replica if [m["model_id"] for m in replica["models"]] == ["mv-0"] else None

    replica = wait_for(unloaded)
    assert replica["replica_id"] == before  # reconfigured, not restarted
    with pytest.raises(KeyError):
        fleet.predict(KIND, "mv-1", TEXTS)
    assert fleet.predict(KIND, "mv-0", TEXTS).replica_id == before


def test_a_model_that_outgrows_its_set_moves_and_keeps_serving(
    fleet: RayFleet, tenant_models: list[PackedModel]
) -> None:
    """mv-1 grows past set 0's budget: it moves to a new set 2 (loaded there before set 0
    lets it go); mv-0 and mv-2 stay where they are, in the same replicas."""
    previous = apply_three(fleet, tenant_models)
    before = {name: r[0]["replica_id"] for name, r in replicas_by_set(fleet).items()}
    pool = replace(POOL, max_sets=3)
    specs = specs_for(tenant_models[:3])
    specs[1] = replace(specs[1], memory_bytes=16_000_000)
    placement = fleet.apply(pool, specs, previous=previous)
    assert placement.assignment == {"mv-0": 0, "mv-1": 2, "mv-2": 1}
    assert placement.moved == ["mv-1"]
    assert fleet.wait_ready(KIND, ["mv-1"], timeout_s=120) == {"mv-1": None}
    result = fleet.predict(KIND, "mv-1", TEXTS)
    reference = load_classifier(tenant_models[1].model_dir).predict(TEXTS)
    assert [o["label"] for o in result.outputs] == [p["label"] for p in reference]

    def settled() -> dict[str, list[dict[str, Any]]] | None:
        sets = replicas_by_set(fleet)
        held = {name: {m["model_id"] for m in r[0]["models"]} for name, r in sets.items() if r}
        expected = {"classifier-set-0": {"mv-0"}, "classifier-set-1": {"mv-2"},
                    "classifier-set-2": {"mv-1"}}  # fmt: skip
        return sets if held == expected else None

    sets = wait_for(settled)
    assert sets["classifier-set-0"][0]["replica_id"] == before["classifier-set-0"]
    assert sets["classifier-set-1"][0]["replica_id"] == before["classifier-set-1"]
    assert result.replica_id == sets["classifier-set-2"][0]["replica_id"]
    fleet.apply(POOL, specs_for(tenant_models[:3]), previous=placement.assignment)


def test_insufficient_capacity_changes_nothing(
    fleet: RayFleet, tenant_models: list[PackedModel]
) -> None:
    specs = specs_for(tenant_models[:3])
    previous = apply_three(fleet, tenant_models)
    before = pool_status(fleet)
    too_many = [*specs, tenant_models[3].spec("mv-3", memory_bytes=10_000_000),
                tenant_models[3].spec("mv-4", memory_bytes=10_000_000)]  # fmt: skip
    with pytest.raises(InsufficientCapacity, match="need 50000000 bytes, have 50000000"):
        fleet.apply(POOL, too_many, previous=previous)
    with pytest.raises(InsufficientCapacity, match="need 30000000 bytes, have 25000000"):
        fleet.apply(POOL, [tenant_models[3].spec("huge", memory_bytes=30_000_000)])
    after = pool_status(fleet)
    assert [s["models"] for s in after["sets"]] == [s["models"] for s in before["sets"]]
    assert fleet.predict(KIND, "mv-1", TEXTS).outputs
    with pytest.raises(KeyError):
        fleet.predict(KIND, "mv-3", TEXTS)


def test_a_killed_replica_comes_back_with_its_models(
    fleet: RayFleet, tenant_models: list[PackedModel]
) -> None:
    import ray

    apply_three(fleet, tenant_models)
    (name,) = fleet.replica_actors(KIND, "classifier-set-0")
    old_id = name.rsplit("#", 1)[1]
    fleet.predict(KIND, "mv-0", TEXTS)  # the driver now holds a connection to the replica
    assert old_id in {endpoint.replica_id for endpoint in fleet._fast._idle}
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def replaced() -> dict[str, Any] | None:
        replicas = replicas_by_set(fleet).get("classifier-set-0", [])
        fresh = [r for r in replicas if r["replica_id"] != old_id]
        loaded = fresh and {m["model_id"] for m in fresh[0]["models"] if m["loaded"]}
        return fresh[0] if loaded == {"mv-0", "mv-1"} else None

    replica = wait_for(replaced, timeout_s=120)
    assert fleet.wait_ready(KIND, ["mv-0", "mv-1"], timeout_s=60) == {"mv-0": None, "mv-1": None}
    result = fleet.predict(KIND, "mv-1", TEXTS)
    assert result.replica_id == replica["replica_id"]
    reference = load_classifier(tenant_models[1].model_dir).predict(TEXTS)
    assert [o["label"] for o in result.outputs] == [p["label"] for p in reference]
    # Once the driver's list of replicas refreshes, nothing is kept open to the dead one.
    time.sleep(DIRECT_REFRESH_S + 0.5)
    assert fleet.predict(KIND, "mv-0", TEXTS).replica_id == replica["replica_id"]
    connected = {endpoint.replica_id for endpoint in fleet._fast._idle}
    assert replica["replica_id"] in connected and old_id not in connected


def test_unpinned_models_load_on_first_use_in_the_tail(
    fleet: RayFleet, tenant_models: list[PackedModel]
) -> None:
    specs = [*specs_for(tenant_models[:1]), tenant_models[3].spec("tail-3", pinned=False)]
    fleet.apply(POOL, specs)
    assert fleet.wait_ready(KIND, ["mv-0", "tail-3"], timeout_s=120) == {
        "mv-0": None,
        "tail-3": None,
    }
    first = fleet.predict(KIND, "tail-3", TEXTS)
    second = fleet.predict(KIND, "tail-3", TEXTS)
    assert first.outputs == second.outputs
    reference = load_classifier(tenant_models[3].model_dir).predict(TEXTS)
    assert [o["label"] for o in first.outputs] == [p["label"] for p in reference]

    def counted() -> dict[str, Any] | None:
        (replica,) = pool_status(fleet)["tail"]["replicas"]
        (model,) = [m for m in replica["models"] if m["model_id"] == "tail-3"]
        return model if model["requests"] == 2 else None

    model = wait_for(counted)
    assert (model["misses"], model["hits"], model["loaded"]) == (1, 1, True)
    assert model["pinned"] is False


def test_a_bad_artifact_fails_alone(
    fleet: RayFleet, tenant_models: list[PackedModel], tmp_path: Path
) -> None:
    good = specs_for(tenant_models[:1])
    bad = ModelSpec(
        model_id="mv-bad",
        artifact_uri=tenant_models[1].tar.as_uri(),
        sha256="0" * 64,
        memory_bytes=1_000_000,
    )
    fleet.apply(POOL, [*good, bad])
    ready = fleet.wait_ready(KIND, ["mv-0", "mv-bad"], timeout_s=120)
    assert ready["mv-0"] is None
    assert "sha256 mismatch" in str(ready["mv-bad"])
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        fleet.predict(KIND, "mv-bad", TEXTS)
    assert fleet.predict(KIND, "mv-0", TEXTS).outputs


def test_a_burst_on_one_set_adds_replicas_to_that_set_only(
    ray_address: str, tenant_models: list[PackedModel], tmp_path: Path
) -> None:
    """Autoscaling per replica set: load on mv-2 (set 1) scales set 1 to two replicas, each
    holding set 1's models; set 0 stays at one replica and nobody's model moves."""
    from concurrent.futures import ThreadPoolExecutor

    fleet = RayFleet(
        address=ray_address,
        namespace=f"scale-{uuid.uuid4().hex[:6]}",
        local_dir=tmp_path,
        num_cpus_per_replica=0.25,
        autoscaling_options={"upscale_delay_s": 1, "downscale_delay_s": 600,
                             "metrics_interval_s": 0.5, "look_back_period_s": 2},
    )  # fmt: skip
    pool = PoolSpec(kind=KIND, replica_memory_bytes=25_000_000, max_sets=2, min_replicas=1,
                    max_replicas=2, target_ongoing_requests=1)  # fmt: skip
    specs = specs_for(tenant_models[:3])
    try:
        placement = fleet.apply(pool, specs)
        fleet.wait_ready(KIND, list(placement.assignment), timeout_s=120)
        texts = TEXTS * 8  # a heavier request, so requests overlap

        def burst() -> list[dict[str, Any]] | None:
            with ThreadPoolExecutor(8) as pool_:
                list(pool_.map(lambda _: fleet.predict(KIND, "mv-2", texts), range(64)))
            replicas = replicas_by_set(fleet)["classifier-set-1"]
            held = [{m["model_id"] for m in r["models"] if m["loaded"]} for r in replicas]
            return replicas if held == [{"mv-2"}, {"mv-2"}] else None

        wait_for(burst, timeout_s=180)
        assert len(replicas_by_set(fleet)["classifier-set-0"]) == 1
        assert fleet.apply(pool, specs, previous=placement.assignment).moved == []
    finally:
        fleet.shutdown_pool(KIND)


def test_waiting_for_a_model_the_pool_was_applied_without_ends_with_not_in_pool(
    fleet: RayFleet, tenant_models: list[PackedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loader that applied the pool and then saw it applied again without its model (the
    # deployment retired meanwhile) must not wait out the whole load timeout.
    from worker.serving import fleet as fleet_module

    monkeypatch.setattr(fleet_module, "NOT_IN_POOL_AFTER_S", 1.0)
    fleet.apply(POOL, specs_for(tenant_models[:1]))
    started = time.monotonic()
    ready = fleet.wait_ready(KIND, ["mv-0", "mv-gone"], timeout_s=120)
    assert ready == {"mv-0": None, "mv-gone": "not in pool"}
    assert time.monotonic() - started < 60


def test_predictions_take_the_replicas_socket_and_fall_back_to_ray_when_it_fails(
    fleet: RayFleet, tenant_models: list[PackedModel]
) -> None:
    """The driver reaches a replica through the socket it publishes (no Ray actor call);
    a socket that cannot be reached costs nothing but the detour through Ray."""
    import socket

    from worker.serving.fastpath import Endpoint

    apply_three(fleet, tenant_models)
    reference = [p["label"] for p in load_classifier(tenant_models[2].model_dir).predict(TEXTS)]

    def assert_same(outputs: list[Any], expected: list[str]) -> None:
        assert [o["label"] for o in outputs] == expected

    def set_1_counts() -> tuple[int, int]:
        (replica,) = replicas_by_set(fleet)["classifier-set-1"]
        (model,) = [m for m in replica["models"] if m["model_id"] == "mv-2"]
        return replica["socket_requests"], model["requests"]

    before_socket, before_total = set_1_counts()
    for _ in range(5):
        assert_same(fleet.predict(KIND, "mv-2", TEXTS).outputs, reference)
    wait_for(lambda: set_1_counts() == (before_socket + 5, before_total + 5), timeout_s=10)

    # Point the driver at a port nobody listens on: the call goes through Ray instead,
    # and the dead address is not tried again on every call.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    fleet.predict(KIND, "mv-2", TEXTS)  # (re)fills the driver's list of set 1's replicas
    (known,) = fleet._replicas[(KIND, "classifier-set-1")][1]
    assert known.endpoint is not None
    known.endpoint = Endpoint(
        "127.0.0.1", closed_port, known.endpoint.secret, known.endpoint.replica_id
    )
    for _ in range(3):
        assert_same(fleet.predict(KIND, "mv-2", TEXTS).outputs, reference)
    wait_for(lambda: set_1_counts() == (before_socket + 6, before_total + 9), timeout_s=10)
    assert known.endpoint in fleet._fast_failed
