from __future__ import annotations

import pytest

from aifab.core.errors import QuotaConfigError, ValidationError
from aifab.core.nodes import NodeState, uniform_node
from aifab.core.queues import Queue, QueueTree, gpu_queue
from aifab.core.workloads import GpuRequest, TaskRequest, Workload


def test_node_state_refuses_to_oversubscribe_a_device() -> None:
    state = NodeState(uniform_node("n1", 2))
    state.allocate((0,), 600, 1000, 0, 0)
    with pytest.raises(ValueError, match="GPU 0 oversubscribed"):
        state.allocate((0,), 500, 1000, 0, 0)
    state.allocate((0,), 400, 1000, 0, 0)
    assert state.gpu_free_milli == [0, 1000]
    assert state.free_whole_gpus == 1


def test_node_state_release_restores_and_checks() -> None:
    state = NodeState(uniform_node("n1", 1, cpu_milli=1000))
    state.allocate((0,), 1000, 81920, 500, 10)
    state.release((0,), 1000, 81920, 500, 10)
    assert state.free_gpu_milli == 1000 and state.free_cpu == 1000
    with pytest.raises(ValueError, match="released more"):
        state.release((0,), 1, 0, 0, 0)


def test_copy_is_independent() -> None:
    a = NodeState(uniform_node("n1", 2))
    b = a.copy()
    b.allocate((1,), 1000, 0, 0, 0)
    assert a.gpu_free_milli == [1000, 1000]


def test_children_may_not_deserve_more_than_parent() -> None:
    with pytest.raises(QuotaConfigError, match="children of 'research' deserve 6 gpu in total"):
        QueueTree(
            [
                gpu_queue("research", 4),
                gpu_queue("vision", 3, parent="research"),
                gpu_queue("nlp", 3, parent="research"),
            ]
        )


def test_tree_lookups() -> None:
    tree = QueueTree(
        [
            gpu_queue("research", 8),
            gpu_queue("vision", 4, parent="research"),
            gpu_queue("nlp", 2, parent="research"),
        ]
    )
    assert tree.roots() == ["research"]
    assert tree.children("research") == ["nlp", "vision"]
    assert tree.leaves() == ["nlp", "vision"]
    assert tree.ancestors("nlp") == ["research"]


@pytest.mark.parametrize(
    ("queues", "message"),
    [
        ([Queue("a", parent="missing")], "unknown parent"),
        ([Queue("a"), Queue("a")], "duplicate queue"),
        ([gpu_queue("a", 4, limit_gpus=2)], "limit 2000 is below deserved 4000"),
        ([gpu_queue("a", -1)], "must be >= 0"),
        ([Queue("a", parent="b"), Queue("b", parent="a")], "cycle"),
    ],
)
def test_bad_queue_trees_name_the_problem(queues: list[Queue], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        QueueTree(queues)


def test_workload_validates_gang_size() -> None:
    task = TaskRequest(gpu=GpuRequest.whole(1))
    with pytest.raises(ValidationError, match="min_available"):
        Workload(id="w", queue="q", tasks=(task,), min_available=2)
    with pytest.raises(ValidationError, match="at least one task"):
        Workload(id="w", queue="q", tasks=())


def test_work_since_checkpoint_uses_the_period() -> None:
    task = TaskRequest(gpu=GpuRequest.whole(1))
    w = Workload(id="w", queue="q", tasks=(task,), start_time=100.0, checkpoint_interval=1800.0)
    # Started at 100, checkpoints at 1900 and 3700: at 4000 it has 300 s unsaved.
    assert w.work_since_checkpoint(4000.0) == pytest.approx(300.0)
    explicit = Workload(id="w", queue="q", tasks=(task,), start_time=100.0, last_checkpoint_time=3900.0)
    assert explicit.work_since_checkpoint(4000.0) == pytest.approx(100.0)
