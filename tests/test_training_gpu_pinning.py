"""One training task per GPU: pool process i is pinned to GPU ids[i]."""

from apps.training.gpu import gpu_for_child


def test_each_pool_process_gets_its_own_gpu():
    assert [gpu_for_child(i, "0,1,2,3") for i in range(4)] == ["0", "1", "2", "3"]


def test_more_processes_than_gpus_wrap_around_and_no_ids_means_no_pinning():
    assert gpu_for_child(5, "2,3") == "3"
    assert gpu_for_child(0, "") is None
