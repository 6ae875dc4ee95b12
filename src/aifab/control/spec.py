"""Workload specs: one declarative YAML (or JSON) document per workload, validated into a JobSpec.

A spec looks like::

    kind: job
    name: mnist-a
    project: vision
    command: ["python", "train.py"]
    resources: {gpus: 0.5, cpu: 2, memory: 4GiB}
    priority: train

Entry points: :func:`parse_spec` (YAML text, from the CLI), :func:`spec_from_dict` (a decoded JSON
body, from the API) and :func:`quick_spec` (``aifab run --gpus 0.5 -- python train.py``). All three
go through the same validator, so a spec is accepted or refused the same way wherever it comes from.

Error convention. Every problem is an :class:`aifab.core.errors.ValidationError` (never a
traceback, never a silent default):

* ``field`` is the path of the offending field: dotted for mappings (``resources.gpus``,
  ``env.1BAD``), brackets for list items (``command[2]``). It is ``None`` for problems with the
  document as a whole (malformed YAML, not a mapping).
* ``message`` says what is wrong, quotes the offending value and says what would be accepted.
  :func:`parse_spec` adds the YAML line (``(job.yaml, line 7)``); malformed YAML is reported as
  ``job.yaml:3:5: invalid YAML: ...``.
* Only the FIRST error is reported, in a fixed order: document shape, ``kind``, unknown fields at
  any level (a typo is the likeliest cause of everything after it), then the fields in the order
  of the table in the docs. One precise error beats a cascade of consequences of the first.

``null`` is accepted only for fields whose default is "unset" (``min_available``, ``preemptible``,
``topology``, ``node_pool``, ``max_runtime``, ``checkpoint_interval``, ``resources.gpu_model``); elsewhere the
field must be left out to get its default.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

# The field validators, scalar helpers and YAML handling live in spec_fields (a private module);
# MAX_NAME_LENGTH and RESERVED_ENV_PREFIX are defined there because its validators use them.
from aifab.control.spec_fields import (
    MAX_NAME_LENGTH,
    RESERVED_ENV_PREFIX,
    _command,
    _cpu_milli,
    _describe,
    _env,
    _fail,
    _gpu_models,
    _gpus,
    _gpus_out,
    _int,
    _line_of,
    _load_yaml,
    _memory_mib,
    _min_available,
    _name,
    _number_out,
    _optional_bool,
    _optional_seconds,
    _Path,
    _priority_class,
    _project,
    _resolve_preemptible,
    _seconds,
    _SpecError,
    _string,
    _topology,
    _without_none,
)
from aifab.core.errors import ValidationError
from aifab.core.workloads import (
    DEFAULT_PRIORITY_CLASSES,
    GpuRequest,
    GpuRequestKind,
    PriorityClass,
    TaskRequest,
    TopologyConstraint,
    Workload,
)

__all__ = [
    "DEFAULT_CHECKPOINT_GRACE",
    "DEFAULT_CPU_MILLI",
    "DEFAULT_MEMORY_MIB",
    "DEFAULT_PRIORITY",
    "KNOWN_KINDS",
    "MAX_NAME_LENGTH",
    "MAX_REPLICAS",
    "RESERVED_ENV_PREFIX",
    "JobSpec",
    "ResourceSpec",
    "parse_duration_seconds",
    "parse_memory_mib",
    "parse_spec",
    "quick_spec",
    "spec_from_dict",
]

KNOWN_KINDS: Final = ("job",)
DEFAULT_PRIORITY: Final = "train"
DEFAULT_CPU_MILLI: Final = 1000
DEFAULT_MEMORY_MIB: Final = 1024
DEFAULT_CHECKPOINT_GRACE: Final = 30.0
MAX_REPLICAS: Final = 10_000  # to_workload builds one TaskRequest per replica: bound the memory

_TOP_FIELDS: Final = (
    "kind",
    "name",
    "project",
    "command",
    "workdir",
    "env",
    "resources",
    "replicas",
    "min_available",
    "priority",
    "preemptible",
    "topology",
    "node_pool",
    "max_runtime",
    "min_runtime",
    "retries",
    "checkpoint_grace",
    "checkpoint_interval",
)
_RESOURCE_FIELDS: Final = ("gpus", "gpu_model", "cpu", "memory")
_TOPOLOGY_FIELDS: Final = ("level", "mode")

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceSpec:
    """What each replica asks for."""

    gpu: GpuRequest = field(default_factory=GpuRequest)
    gpu_models: tuple[str, ...] = ()  # any of these models; empty = any model
    cpu_milli: int = DEFAULT_CPU_MILLI
    memory_mib: int = DEFAULT_MEMORY_MIB

    def task(self) -> TaskRequest:
        return TaskRequest(gpu=self.gpu, cpu_milli=self.cpu_milli, memory_mib=self.memory_mib)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gpus": _gpus_out(self.gpu)}
        if self.gpu_models:
            out["gpu_model"] = list(self.gpu_models)
        out["cpu"] = _number_out(self.cpu_milli / 1000)
        out["memory"] = self.memory_mib
        return out


def _empty_env() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """A validated ``kind: job`` spec. Build it with :func:`parse_spec`, :func:`spec_from_dict` or
    :func:`quick_spec`: the constructor itself does not validate.

    Times are seconds. ``preemptible`` is ``None`` when the spec leaves it to the priority class
    (resolved by :meth:`to_workload`, against the server's class table).
    """

    kind: Literal["job"] = "job"
    name: str
    project: str
    command: tuple[str, ...]
    workdir: str = "."
    env: Mapping[str, str] = field(default_factory=_empty_env, hash=False)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    replicas: int = 1
    min_available: int = 1
    priority: str = DEFAULT_PRIORITY
    preemptible: bool | None = None
    topology: TopologyConstraint | None = None
    node_pool: str | None = None  # None: the project's pool, else any
    max_runtime: float | None = None
    min_runtime: float = 0.0
    retries: int = 0
    checkpoint_grace: float = DEFAULT_CHECKPOINT_GRACE
    checkpoint_interval: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON-able form: defaults filled in, unset optional fields left out.

        ``spec_from_dict(spec.to_dict()) == spec`` always holds.
        """
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "project": self.project,
            "command": list(self.command),
            "workdir": self.workdir,
            "env": dict(self.env),
            "resources": self.resources.to_dict(),
            "replicas": self.replicas,
            "min_available": self.min_available,
            "priority": self.priority,
        }
        if self.preemptible is not None:
            out["preemptible"] = self.preemptible
        if self.topology is not None:
            out["topology"] = {"level": self.topology.level, "mode": self.topology.mode.value}
        if self.node_pool is not None:
            out["node_pool"] = self.node_pool
        if self.max_runtime is not None:
            out["max_runtime"] = _number_out(self.max_runtime)
        out["min_runtime"] = _number_out(self.min_runtime)
        out["retries"] = self.retries
        out["checkpoint_grace"] = _number_out(self.checkpoint_grace)
        if self.checkpoint_interval is not None:
            out["checkpoint_interval"] = _number_out(self.checkpoint_interval)
        return out

    def to_workload(
        self,
        workload_id: str,
        submit_time: float,
        classes: Mapping[str, PriorityClass] = DEFAULT_PRIORITY_CLASSES,
        **overrides: Any,
    ) -> Workload:
        """The scheduler's view of this job: one TaskRequest per replica, queued in its project.

        ``classes`` is checked again here because the server's table may differ from the one the
        spec was validated against. ``overrides`` go to :func:`dataclasses.replace` (the control
        plane restores phase, placements, start_time, last_checkpoint_time that way).
        """
        try:
            pclass = _priority_class(self.priority, classes, ("priority",))
            preemptible = _resolve_preemptible(self.preemptible, pclass, classes)
        except _SpecError as err:
            raise _to_validation_error(err) from None
        workload = Workload(
            id=workload_id,
            queue=self.project,
            tasks=(self.resources.task(),) * self.replicas,
            min_available=self.min_available,
            priority_class=pclass.name,
            priority=pclass.value,
            preemptible=preemptible,
            gpu_models=frozenset(self.resources.gpu_models),
            topology=self.topology,
            node_pool=self.node_pool,
            submit_time=submit_time,
            checkpoint_interval=self.checkpoint_interval,
            min_runtime=self.min_runtime,
        )
        return replace(workload, **overrides) if overrides else workload


# ---------------------------------------------------------------------------------- public API


def parse_spec(
    text: str, source: str = "<spec>", classes: Mapping[str, PriorityClass] = DEFAULT_PRIORITY_CLASSES
) -> JobSpec:
    """Parse one YAML document into a JobSpec; ``source`` (a file name) appears in errors."""
    data = _load_yaml(text, source)
    try:
        return _build(data, classes)
    except _SpecError as err:
        line = _line_of(text, err.path) if err.path else None
        raise _to_validation_error(err, f"{source}, line {line}" if line else None) from None


def spec_from_dict(
    data: Mapping[str, Any],
    source: str = "<spec>",
    classes: Mapping[str, PriorityClass] = DEFAULT_PRIORITY_CLASSES,
) -> JobSpec:
    """Validate an already decoded document (a JSON body) exactly as :func:`parse_spec` does.

    ``source`` is accepted for symmetry; a dict has no lines to point at, and ``field`` already
    names the offending entry.
    """
    del source
    try:
        return _build(data, classes)
    except _SpecError as err:
        raise _to_validation_error(err) from None


def quick_spec(
    name: str,
    project: str,
    command: Sequence[str] | str,
    gpus: str | float | None = None,
    cpu: str | float | None = None,
    memory: str | int | None = None,
    priority: str | None = None,
    *,
    gpu_model: str | Sequence[str] | None = None,
    replicas: int | None = None,
    min_available: int | None = None,
    workdir: str | None = None,
    env: Mapping[str, object] | None = None,
    preemptible: bool | None = None,
    topology: Mapping[str, str] | None = None,
    node_pool: str | None = None,
    max_runtime: str | float | None = None,
    min_runtime: str | float | None = None,
    retries: int | None = None,
    checkpoint_grace: str | float | None = None,
    checkpoint_interval: str | float | None = None,
    classes: Mapping[str, PriorityClass] = DEFAULT_PRIORITY_CLASSES,
) -> JobSpec:
    """A spec from command-line flags (``aifab run --gpus 0.5 --project vision -- python x.py``).

    ``None`` means "flag not given": the key is left out and the spec default applies. ``gpus`` may
    be the flag's raw text ("0.5", "2", "20GiB"). The result goes through :func:`spec_from_dict`, so
    flags are validated exactly like a YAML file.
    """
    data: dict[str, Any] = {"kind": "job", "name": name, "project": project}
    data["command"] = command if isinstance(command, str) else list(command)
    resources = _without_none(
        {
            "gpus": gpus,
            "gpu_model": gpu_model if gpu_model is None or isinstance(gpu_model, str) else list(gpu_model),
            "cpu": cpu,
            "memory": memory,
        }
    )
    if resources:
        data["resources"] = resources
    data |= _without_none(
        {
            "workdir": workdir,
            "env": None if env is None else dict(env),
            "replicas": replicas,
            "min_available": min_available,
            "priority": priority,
            "preemptible": preemptible,
            "topology": None if topology is None else dict(topology),
            "node_pool": node_pool,
            "max_runtime": max_runtime,
            "min_runtime": min_runtime,
            "retries": retries,
            "checkpoint_grace": checkpoint_grace,
            "checkpoint_interval": checkpoint_interval,
        }
    )
    return spec_from_dict(data, "<command line>", classes)


def parse_memory_mib(value: object, field: str = "memory") -> int:
    """``"512MiB"``, ``"4GiB"``, ``"4G"``, ``"1.5Gi"`` or a plain number (MiB) -> MiB, rounded up.

    Units are binary whatever the spelling (4G == 4GB == 4GiB). Must be > 0.
    """
    return _public(_memory_mib, value, field)


def parse_duration_seconds(value: object, field: str = "duration") -> float:
    """``3600``, ``"2h"``, ``"30m"``, ``"45s"``, ``"1h30m"``, ``"1.5d"`` -> seconds (>= 0)."""
    return _public(lambda v, p: _seconds(v, p, allow_zero=True), value, field)


def _public(parse: Callable[[object, _Path], _T], value: object, field: str) -> _T:
    try:
        return parse(value, (field,))
    except _SpecError as err:
        raise _to_validation_error(err) from None


# ------------------------------------------------------------------------------------ building


def _build(data: object, classes: Mapping[str, PriorityClass]) -> JobSpec:
    if data is None:
        _fail((), "the spec is empty: it needs at least kind, name, project and command")
    if not isinstance(data, Mapping):
        _fail((), f"a spec must be a mapping of fields (kind, name, project, ...), got {_describe(data)}")
    _check_kind(data)
    _check_unknown_fields(data)
    for required in ("name", "project", "command"):
        if required not in data:
            _fail((required,), "is required")

    # Fields are read in the documented order so that the first error reported is stable.
    name = _name(data["name"], ("name",))
    project = _project(data["project"], ("project",))
    command = _command(data["command"], ("command",))
    workdir = _string(data.get("workdir", "."), ("workdir",))
    env = _env(data.get("env", {}), ("env",))
    resources = _resources(data.get("resources", {}), ("resources",))
    replicas = _int(data.get("replicas", 1), ("replicas",), minimum=1, maximum=MAX_REPLICAS)
    min_available = _min_available(data.get("min_available"), replicas)
    pclass = _priority_class(data.get("priority", DEFAULT_PRIORITY), classes, ("priority",))
    preemptible = _optional_bool(data.get("preemptible"), ("preemptible",))
    _resolve_preemptible(preemptible, pclass, classes)  # refuse true for a non-preemptible class
    topology = _topology(data.get("topology"), ("topology",))
    node_pool = None if data.get("node_pool") is None else _name(data["node_pool"], ("node_pool",))
    max_runtime = _optional_seconds(data.get("max_runtime"), ("max_runtime",))
    min_runtime = _seconds(data.get("min_runtime", 0), ("min_runtime",), allow_zero=True)
    if max_runtime is not None and min_runtime > max_runtime:
        _fail(
            ("min_runtime",),
            f"the guaranteed runtime ({_number_out(min_runtime)}s) exceeds "
            f"max_runtime ({_number_out(max_runtime)}s)",
        )
    retries = _int(data.get("retries", 0), ("retries",), minimum=0)
    grace = _seconds(
        data.get("checkpoint_grace", DEFAULT_CHECKPOINT_GRACE), ("checkpoint_grace",), allow_zero=True
    )
    checkpoint_interval = _optional_seconds(data.get("checkpoint_interval"), ("checkpoint_interval",))
    return JobSpec(
        name=name,
        project=project,
        command=command,
        workdir=workdir,
        env=env,
        resources=resources,
        replicas=replicas,
        min_available=min_available,
        priority=pclass.name,
        preemptible=preemptible,
        topology=topology,
        node_pool=node_pool,
        max_runtime=max_runtime,
        min_runtime=min_runtime,
        retries=retries,
        checkpoint_grace=grace,
        checkpoint_interval=checkpoint_interval,
    )


def _check_kind(data: Mapping[Any, Any]) -> None:
    known = ", ".join(KNOWN_KINDS)
    if "kind" not in data:
        _fail(("kind",), f"is required; known kinds: {known}")
    kind = data["kind"]
    if not isinstance(kind, str):
        _fail(("kind",), f"must be a string, got {_describe(kind)}; known kinds: {known}")
    if kind not in KNOWN_KINDS:
        _fail(("kind",), f"unknown kind {kind!r}; known kinds: {known} (only jobs are supported for now)")


def _check_unknown_fields(data: Mapping[Any, Any]) -> None:
    _check_keys(data, _TOP_FIELDS, ())
    for name, known in (("resources", _RESOURCE_FIELDS), ("topology", _TOPOLOGY_FIELDS)):
        block = data.get(name)
        if isinstance(block, Mapping):
            _check_keys(block, known, (name,))


def _check_keys(block: Mapping[Any, Any], known: Sequence[str], path: _Path) -> None:
    for key in block:
        if isinstance(key, str) and key in known:
            continue
        text = str(key)
        where = f" in {'.'.join(str(p) for p in path)}" if path else ""
        hint = difflib.get_close_matches(text, known, n=1)
        suggestion = f"did you mean {hint[0]}?" if hint else f"known fields: {', '.join(known)}"
        _fail((*path, text), f"unknown field {text!r}{where}; {suggestion}")


# Builds the ResourceSpec model, so it lives here with _build rather than in spec_fields.
def _resources(value: object, path: _Path) -> ResourceSpec:
    if not isinstance(value, Mapping):
        _fail(path, f"must be a mapping (gpus, gpu_model, cpu, memory), got {_describe(value)}")
    gpu = _gpus(value.get("gpus", 0), (*path, "gpus"))
    gpu_models = _gpu_models(value.get("gpu_model"), (*path, "gpu_model"))
    if gpu_models and gpu.kind is GpuRequestKind.NONE:
        _fail((*path, "gpu_model"), "a GPU model is given but no GPU is requested: set gpus too")
    return ResourceSpec(
        gpu=gpu,
        gpu_models=gpu_models,
        cpu_milli=_cpu_milli(value.get("cpu", DEFAULT_CPU_MILLI / 1000), (*path, "cpu")),
        memory_mib=_memory_mib(value.get("memory", DEFAULT_MEMORY_MIB), (*path, "memory")),
    )


def _to_validation_error(err: _SpecError, where: str | None = None) -> ValidationError:
    message = f"{err.message} ({where})" if where else err.message
    return ValidationError(message, field=_format_path(err.path))


def _format_path(path: _Path) -> str | None:
    if not path:
        return None
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
