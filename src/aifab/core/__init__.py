"""Pure domain model: resources, nodes, queues, workloads, decisions. No I/O here."""

from aifab.core.decisions import Bind, CycleResult, Evict, EvictionCause, PendingReason, ReasonCode
from aifab.core.errors import AifabError, TraceError, ValidationError
from aifab.core.nodes import GpuDevice, Node, NodeState, uniform_node
from aifab.core.queues import Queue, QueueTree, ResourceQuota, gpu_queue
from aifab.core.resources import GPU_MILLI, ResourceKind, Resources
from aifab.core.snapshot import ClusterSnapshot, WorkloadChanges
from aifab.core.workloads import (
    DEFAULT_PRIORITY_CLASSES,
    GpuRequest,
    GpuRequestKind,
    PriorityClass,
    TaskPlacement,
    TaskRequest,
    TopologyConstraint,
    TopologyMode,
    Workload,
    WorkloadPhase,
)

__all__ = [
    "DEFAULT_PRIORITY_CLASSES",
    "GPU_MILLI",
    "AifabError",
    "Bind",
    "ClusterSnapshot",
    "CycleResult",
    "Evict",
    "EvictionCause",
    "GpuDevice",
    "GpuRequest",
    "GpuRequestKind",
    "Node",
    "NodeState",
    "PendingReason",
    "PriorityClass",
    "Queue",
    "QueueTree",
    "ReasonCode",
    "ResourceKind",
    "ResourceQuota",
    "Resources",
    "TaskPlacement",
    "TaskRequest",
    "TopologyConstraint",
    "TopologyMode",
    "TraceError",
    "ValidationError",
    "Workload",
    "WorkloadChanges",
    "WorkloadPhase",
    "gpu_queue",
    "uniform_node",
]
