"""Small hand-made scenarios for engine tests."""

from __future__ import annotations

from aifab.core.nodes import uniform_node
from aifab.core.queues import QueueTree, gpu_queue
from aifab.core.workloads import GpuRequest, TaskRequest, Workload
from aifab.sim.model import Scenario, SimConfig, SimJob


def job(
    jid: str,
    submit: float,
    work: float,
    gpus: int,
    *,
    queue: str = "p0",
    tasks: int = 1,
    priority: int = 50,
    checkpoint: float | None = 1800.0,
) -> SimJob:
    per = gpus // tasks
    wl = Workload(
        id=jid,
        queue=queue,
        tasks=tuple(TaskRequest(gpu=GpuRequest.whole(per)) for _ in range(tasks)),
        priority=priority,
        submit_time=submit,
        checkpoint_interval=checkpoint,
        expected_duration=work,
    )
    return SimJob(wl, work)


def scenario(
    jobs: list[SimJob],
    *,
    nodes: int = 2,
    gpus: int = 8,
    deserved: dict[str, float] | None = None,
    **sim: float,
) -> Scenario:
    deserved = deserved or {"p0": nodes * gpus}
    return Scenario(
        "test",
        tuple(uniform_node(f"n{i}", gpus) for i in range(nodes)),
        QueueTree(gpu_queue(q, d) for q, d in deserved.items()),
        tuple(sorted(jobs, key=lambda j: j.submit_time)),
        SimConfig(**sim),  # type: ignore[arg-type]
    )
