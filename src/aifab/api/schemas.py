"""Response and request bodies of the REST API (pydantic models: they make the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class WorkloadOut(BaseModel):
    id: str
    name: str
    project: str
    phase: str
    gpus: float | int | str
    replicas: int
    priority: str
    attempt: int
    submit_time: float
    start_time: float | None
    end_time: float | None
    reason: str | None
    reason_code: str | None


class TaskOut(BaseModel):
    attempt: int
    task: int
    node: str
    devices: list[int]
    gpu_milli: int
    state: str
    exit_code: int | None
    started_at: float | None
    finished_at: float | None


class EventOut(BaseModel):
    time: float
    kind: str
    message: str


class WorkloadDetail(WorkloadOut):
    spec: dict[str, Any]
    checkpoint_dir: str
    last_checkpoint_time: float | None
    lost_gpu_seconds: float
    failures: int
    created_by: str | None
    events: list[EventOut]
    tasks: list[TaskOut]


class LogChunk(BaseModel):
    text: str
    offset: int
    attempt: int
    done: bool


class ProjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parent: str | None = None
    # Bounds keep every value inside what the store holds (a 64-bit integer of milli-GPUs).
    deserved_gpus: float = Field(0.0, ge=0, le=1_000_000)
    over_quota_weight: float = Field(1.0, ge=0, le=1_000_000)
    limit_gpus: float | None = Field(None, ge=0, le=1_000_000)
    priority: int = Field(0, ge=-1000, le=1000)
    node_pool: str | None = Field(None, description="the pool its workloads run in unless they name one")
    max_runtime: float | None = Field(None, gt=0, le=10**9, description="seconds; caps every workload")
    min_runtime: float | None = Field(
        None, ge=0, le=10**9, description="seconds guaranteed before preemption"
    )
    retries: int | None = Field(None, ge=0, le=1000, description="retries after a failure (at least)")


class ProjectOut(BaseModel):
    name: str
    parent: str | None
    deserved_gpus: float
    limit_gpus: float | None
    over_quota_weight: float
    fair_share_gpus: float
    in_use_gpus: float
    pending: int
    node_pool: str | None = None
    max_runtime: float | None = None
    min_runtime: float | None = None
    retries: int | None = None


class NodeOut(BaseModel):
    name: str
    pool: str
    backend: str
    state: str = "ready"  # ready, gone, or unreachable: why (the pool's engine cannot be asked)
    schedulable: bool
    gpus: int
    gpu_model: str | None
    gpus_in_use: float
    cpu: float
    cpu_in_use: float
    memory_mib: int
    virtual_gpus: bool


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63)
    admin: bool = False
    roles: dict[str, Literal["member", "viewer"]] = Field(default_factory=dict)
