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
``topology``, ``max_runtime``, ``checkpoint_interval``, ``resources.gpu_model``); elsewhere the
field must be left out to get its default.
"""

from __future__ import annotations

import difflib
import math
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn, TypeVar

import yaml

from aifab.core.errors import ValidationError
from aifab.core.resources import GPU_MILLI, format_gpus
from aifab.core.workloads import (
    DEFAULT_PRIORITY_CLASSES,
    GpuRequest,
    GpuRequestKind,
    PriorityClass,
    TaskRequest,
    TopologyConstraint,
    TopologyMode,
    Workload,
)

KNOWN_KINDS: Final = ("job",)
DEFAULT_PRIORITY: Final = "train"
DEFAULT_CPU_MILLI: Final = 1000
DEFAULT_MEMORY_MIB: Final = 1024
DEFAULT_CHECKPOINT_GRACE: Final = 30.0
MAX_NAME_LENGTH: Final = 63  # a DNS label, and the width of the name columns in the database
MAX_REPLICAS: Final = 10_000  # to_workload builds one TaskRequest per replica: bound the memory
RESERVED_ENV_PREFIX: Final = "AIFAB_"  # set by the control plane (see aifab.runtime)

# Integers beyond 2**53 do not survive a trip through JSON (JavaScript clients, float columns).
_MAX_NUMBER: Final = 2**53

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
    "max_runtime",
    "min_runtime",
    "retries",
    "checkpoint_grace",
    "checkpoint_interval",
)
_RESOURCE_FIELDS: Final = ("gpus", "gpu_model", "cpu", "memory")
_TOPOLOGY_FIELDS: Final = ("level", "mode")

_NAME_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_RE: Final = r"(?:\d+(?:\.\d+)?|\.\d+)"
_QUANTITY_RE: Final = re.compile(rf"\s*({_NUMBER_RE})\s*([A-Za-z]*)\s*")
_DURATION_PART_RE: Final = re.compile(rf"({_NUMBER_RE})([dhms])")

# Binary units whatever the spelling, as docker does: "4G" == "4GB" == "4GiB" == 4096 MiB.
# Users write "GB" meaning GiB far more often than they mean 10**9 bytes, and a request rounded
# a few percent low would be a worse surprise than one rounded high.
_MIB_PER_UNIT: Final[Mapping[str, Fraction]] = {
    "b": Fraction(1, 2**20),
    **dict.fromkeys(("k", "kb", "ki", "kib"), Fraction(1, 2**10)),
    **dict.fromkeys(("", "m", "mb", "mi", "mib"), Fraction(1)),
    **dict.fromkeys(("g", "gb", "gi", "gib"), Fraction(2**10)),
    **dict.fromkeys(("t", "tb", "ti", "tib"), Fraction(2**20)),
}
_SECONDS_PER_UNIT: Final[Mapping[str, int]] = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}

_Path = tuple[str | int, ...]
_T = TypeVar("_T")


class _SpecError(Exception):
    """A problem at a structured path; turned into a ValidationError at the public boundary."""

    def __init__(self, path: _Path, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _fail(path: _Path, message: str) -> NoReturn:
    raise _SpecError(path, message)


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


# ------------------------------------------------------------------------------- single fields


def _name(value: object, path: _Path) -> str:
    name = _string(value, path)
    if len(name) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(name):
        return name
    message = (
        f"{name!r} is not a valid name: use lowercase letters, digits and '-', starting and ending "
        f"with a letter or digit, at most {MAX_NAME_LENGTH} characters"
    )
    suggestion = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:MAX_NAME_LENGTH].rstrip("-")
    if suggestion and _NAME_RE.fullmatch(suggestion):
        message += f" (for example {suggestion!r})"
    _fail(path, message)


def _project(value: object, path: _Path) -> str:
    # Whether the project exists is the server's business; here only its shape.
    project = _string(value, path)
    if len(project) > MAX_NAME_LENGTH or not re.fullmatch(r"\S+", project):
        _fail(path, f"{project!r} is not a project name: no spaces, at most {MAX_NAME_LENGTH} characters")
    return project


def _command(value: object, path: _Path) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(_string(value, path))
        except ValueError as err:  # an unclosed quote
            _fail(path, f"cannot split {value!r} into arguments: {err}")
    elif isinstance(value, list | tuple):
        argv = [_string(item, (*path, i), allow_empty=True) for i, item in enumerate(value)]
    else:
        _fail(path, f"must be a list of strings or one command line string, got {_describe(value)}")
    if not argv:
        _fail(path, "must not be empty: give the program to run, e.g. ['python', 'train.py']")
    if not argv[0]:
        _fail((*path, 0), "the program name must not be empty")
    return tuple(argv)


def _env(value: object, path: _Path) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        _fail(path, f"must be a mapping of NAME: value, got {_describe(value)}")
    env: dict[str, str] = {}
    for key, raw in value.items():
        where = (*path, str(key))
        if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
            _fail(
                where,
                f"{str(key)!r} is not a valid environment variable name: "
                "letters, digits and '_', not starting with a digit",
            )
        if key.startswith(RESERVED_ENV_PREFIX):
            _fail(where, f"variables starting with {RESERVED_ENV_PREFIX} are set by aifab itself")
        env[key] = _env_value(raw, where)
    return MappingProxyType(env)


def _env_value(value: object, path: _Path) -> str:
    # YAML turns `DEBUG: true` and `SEED: 42` into a bool and an int; the process gets text, and
    # "true" is what the user typed (Python's str(True) would be "True").
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if not isinstance(value, str):
        _fail(path, f"must be a string, a number or a boolean, got {_describe(value)}")
    return _string(value, path, allow_empty=True)


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


_GPUS_HELP: Final = "use a count of whole GPUs (2), a fraction of one GPU (0.5) or GPU memory ('20GiB')"


def _gpus(value: object, path: _Path) -> GpuRequest:
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+", text):
            return _gpu_count(int(text), path)
        if re.fullmatch(_NUMBER_RE, text):
            return _gpu_number(float(text), path)
        try:
            return GpuRequest.memory(_memory_mib(text, path))
        except _SpecError:
            _fail(path, f"{value!r} is not a GPU request; {_GPUS_HELP}")
    if isinstance(value, int) and not isinstance(value, bool):
        return _gpu_count(value, path)
    if isinstance(value, float):
        return _gpu_number(value, path)
    _fail(path, f"must be a number or a memory size, got {_describe(value)}; {_GPUS_HELP}")


def _gpu_count(count: int, path: _Path) -> GpuRequest:
    if count < 0:
        _fail(path, f"must be >= 0, got {count}; {_GPUS_HELP}")
    if count > _MAX_NUMBER:
        _fail(path, f"{count} GPUs is more than any cluster has")
    return GpuRequest.whole(count)


def _gpu_number(value: float, path: _Path) -> GpuRequest:
    if not math.isfinite(value) or value < 0:
        _fail(path, f"must be >= 0, got {value}; {_GPUS_HELP}")
    if value == 0:
        # 0.0 reads like an attempted fraction; 0 (an integer) is the way to say "no GPU".
        _fail(path, "a GPU fraction must be above 0; write gpus: 0 for no GPU")
    if value >= 1:
        if value.is_integer():
            return _gpu_count(int(value), path)
        _fail(
            path,
            f"{value:g} GPUs is not a shape aifab can place: ask for whole GPUs (1, 2, ...) "
            "or a fraction of one GPU below 1 (0.5)",
        )
    milli = round(value * GPU_MILLI)
    if not 0 < milli < GPU_MILLI:
        _fail(path, f"{value} rounds to {format_gpus(milli)} GPU; fractions go in steps of 0.001")
    return GpuRequest(GpuRequestKind.FRACTION, milli=milli)


def _gpu_models(value: object, path: _Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_string(value, path),)
    if not isinstance(value, list | tuple):
        _fail(path, f"must be a GPU model name or a list of them, got {_describe(value)}")
    models = [_string(item, (*path, i)) for i, item in enumerate(value)]
    return tuple(dict.fromkeys(models))  # dedupe, keep the user's order


def _cpu_milli(value: object, path: _Path) -> int:
    if isinstance(value, str):
        # Kubernetes style "500m" (millicores) next to plain "0.5".
        match = re.fullmatch(rf"\s*({_NUMBER_RE})\s*(m?)\s*", value)
        if not match:
            _fail(path, f"{value!r} is not a CPU amount: use cores (2, 0.5) or millicores ('500m')")
        cores = Fraction(match[1]) / (1000 if match[2] else 1)
    else:
        cores = _number(value, path, "cores (2, 0.5)")
    if cores <= 0:
        _fail(path, f"must be > 0 cores, got {_number_out(float(cores))}")
    milli = round(cores * 1000)
    if milli < 1:
        _fail(path, f"{_number_out(float(cores))} cores is below the smallest unit (0.001 cores)")
    return _at_most(milli, path)


def _memory_mib(value: object, path: _Path) -> int:
    help_text = "use a size like '512MiB', '4GiB' or '4G', or a number of MiB"
    if isinstance(value, str):
        match = _QUANTITY_RE.fullmatch(value)
        if not match:
            _fail(path, f"{value!r} is not a memory size; {help_text}")
        factor = _MIB_PER_UNIT.get(match[2].lower())
        if factor is None:
            _fail(path, f"unknown unit {match[2]!r} in {value!r}; {help_text}")
        mib = Fraction(match[1]) * factor
    else:
        mib = _number(value, path, help_text)
    if mib <= 0:
        _fail(path, f"must be > 0, got {value!r}; {help_text}")
    return _at_most(math.ceil(mib), path)  # round up: never grant less than asked for


def _seconds(value: object, path: _Path, *, allow_zero: bool) -> float:
    help_text = "use seconds (3600) or a duration like '2h', '30m', '45s', '1h30m'"
    if isinstance(value, str):
        text = re.sub(r"\s+", "", value.lower())
        if re.fullmatch(_NUMBER_RE, text):
            seconds = Fraction(text)
        elif text and re.fullmatch(rf"(?:{_DURATION_PART_RE.pattern})+", text):
            seconds = sum(
                (Fraction(n) * _SECONDS_PER_UNIT[u] for n, u in _DURATION_PART_RE.findall(text)),
                Fraction(0),
            )
        else:
            _fail(path, f"{value!r} is not a duration; {help_text}")
    else:
        seconds = _number(value, path, help_text)
    if seconds < 0 or (seconds == 0 and not allow_zero):
        _fail(path, f"must be {'>=' if allow_zero else '>'} 0 seconds, got {value!r}")
    if seconds > _MAX_NUMBER:
        _fail(path, f"{value!r} is too long")
    return float(seconds)


def _optional_seconds(value: object, path: _Path) -> float | None:
    return None if value is None else _seconds(value, path, allow_zero=False)


def _min_available(value: object, replicas: int) -> int:
    if value is None:
        return replicas  # the whole gang
    path: _Path = ("min_available",)
    n = _int(value, path, minimum=None)
    if not 1 <= n <= replicas:
        _fail(path, f"must be between 1 and replicas ({replicas}), got {n}")
    return n


def _priority_class(value: object, classes: Mapping[str, PriorityClass], path: _Path) -> PriorityClass:
    known = ", ".join(classes)
    if not isinstance(value, str):
        _fail(path, f"must be a priority class name ({known}), got {_describe(value)}")
    if value not in classes:
        hint = difflib.get_close_matches(value, list(classes), n=1)
        prefix = f"did you mean {hint[0]}? " if hint else ""
        _fail(path, f"unknown priority class {value!r}; {prefix}known classes: {known}")
    return classes[value]


def _resolve_preemptible(
    preemptible: bool | None, pclass: PriorityClass, classes: Mapping[str, PriorityClass]
) -> bool:
    if preemptible is None:
        return pclass.preemptible
    if preemptible and not pclass.preemptible:
        # Letting a protected class be evicted would be harmless, but it almost always means the
        # user picked the wrong class; the class is what gives the job its place in line.
        preemptible_classes = ", ".join(c.name for c in classes.values() if c.preemptible) or "none"
        _fail(
            ("preemptible",),
            f"priority class {pclass.name} is not preemptible; leave preemptible out or pick a "
            f"preemptible class ({preemptible_classes})",
        )
    return preemptible


def _topology(value: object, path: _Path) -> TopologyConstraint | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        _fail(path, f"must be a mapping like {{level: node, mode: required}}, got {_describe(value)}")
    if "level" not in value:
        _fail((*path, "level"), "is required: the domain all tasks share ('node', 'rack', ...)")
    level = _string(value["level"], (*path, "level"))
    mode = value.get("mode", TopologyMode.REQUIRED.value)
    modes = [m.value for m in TopologyMode]
    if not isinstance(mode, str) or mode not in modes:
        _fail((*path, "mode"), f"must be one of {', '.join(modes)}, got {_describe(mode)}")
    return TopologyConstraint(level=level, mode=TopologyMode(mode))


# ------------------------------------------------------------------------------------ scalars


def _string(value: object, path: _Path, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        _fail(path, f"must be a string, got {_describe(value)}")
    if not allow_empty and not value.strip():
        _fail(path, "must not be empty")
    if "\x00" in value:  # the OS cannot pass it to a process (argv, env, paths)
        _fail(path, "must not contain a NUL character")
    return value


def _int(value: object, path: _Path, *, minimum: int | None, maximum: int = _MAX_NUMBER) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # 2.0 from a JSON client is 2
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"must be a whole number, got {_describe(value)}")
    if minimum is not None and value < minimum:
        _fail(path, f"must be >= {minimum}, got {value}")
    if value > maximum:
        _fail(path, f"must be at most {maximum}, got {value}")
    return value


def _number(value: object, path: _Path, help_text: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(path, f"must be a number or a string, got {_describe(value)}; {help_text}")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(path, f"must be a finite number, got {value}; {help_text}")
    if abs(value) > _MAX_NUMBER:
        _fail(path, f"{value} is too large")
    return Fraction(value)


def _optional_bool(value: object, path: _Path) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    _fail(path, f"must be true or false, got {_describe(value)}")


def _at_most(value: int, path: _Path) -> int:
    if value > _MAX_NUMBER:
        _fail(path, f"{value} is too large")
    return value


def _describe(value: object) -> str:
    """A short, type-revealing rendering for messages: "a string 'x'", "null", "a list"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    kind = {str: "a string", int: "an integer", float: "a number"}.get(
        type(value), f"a {type(value).__name__}"
    )
    return f"{kind} {text}"


# --------------------------------------------------------------------------------- canonical out


def _number_out(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _gpus_out(gpu: GpuRequest) -> int | float | str:
    if gpu.kind is GpuRequestKind.FRACTION:
        return gpu.milli / GPU_MILLI
    if gpu.kind is GpuRequestKind.MEMORY:
        return f"{gpu.memory_mib}MiB"
    return gpu.count


def _without_none(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


# ------------------------------------------------------------------------------------- YAML


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass: plain data only
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        context = ""
        if err.context and err.problem:
            # "while parsing a flow sequence started at line 5, column 7": where the fix goes.
            started = err.context_mark
            at = f" started at line {started.line + 1}, column {started.column + 1}" if started else ""
            context = f" ({err.context}{at})"
        raise ValidationError(f"{where}: invalid YAML: {err.problem or err.context}{context}") from None
    except yaml.YAMLError as err:
        raise ValidationError(f"{source}: invalid YAML: {err}") from None
    except RecursionError:
        raise ValidationError(f"{source}: invalid YAML: nested too deeply") from None


def _line_of(text: str, path: _Path) -> int | None:
    """Best effort: the 1-based line of the node at ``path`` (the key's line for a mapping entry)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for part in path:
        if node is None:
            break
        if isinstance(node, yaml.MappingNode):
            entry = next((kv for kv in node.value if getattr(kv[0], "value", None) == str(part)), None)
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


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
