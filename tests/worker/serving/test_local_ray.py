"""The embedded Ray head: started once per local dir, reused, stopped without leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.serving import local_ray
from worker.serving.fleet import RayFleet


def test_without_a_running_head_nothing_starts_and_nothing_is_served(tmp_path: Path) -> None:
    fleet = RayFleet(address=None, local_dir=tmp_path)
    assert fleet.status() == {"pools": []}
    with pytest.raises(KeyError):
        fleet.predict("classifier", "mv-1", ["hello"])
    assert fleet.wait_ready("classifier", ["mv-1"], timeout_s=1) == {"mv-1": "no fleet running"}
    assert not (tmp_path / local_ray.STATE_FILE).exists()


def test_a_head_is_started_once_reused_and_stopped_whole(tmp_path: Path) -> None:
    head = local_ray.ensure_head(tmp_path / "ray", num_cpus=1)
    try:
        assert local_ray.is_alive(head)
        assert local_ray.ensure_head(tmp_path / "ray", num_cpus=1) == head  # reused
        processes = local_ray._descendants(head.pid)
        assert len(processes) >= 2  # at least the GCS server and the raylet
        assert Path(head.token_path).read_text() != ""
    finally:
        local_ray.stop_head(head.pid)
    assert not local_ray.is_alive(head)
    assert [p for p in processes if local_ray._alive(p)] == []
