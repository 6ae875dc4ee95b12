"""Field validators for workload specs, split out of :mod:`aifab.control.spec` to keep it short.

Holds what turns one raw field into a typed value: the per-field validators (name, command, env,
GPUs, CPU, memory, durations, priority, topology), the scalar helpers they share, the
canonical-output helpers used by ``to_dict`` and the YAML loader and line finder, together with the
error plumbing (:class:`_SpecError`, :func:`_fail`, ``_Path``). Nothing here is public API: import
from :mod:`aifab.control.spec`, which assembles these into a JobSpec and turns ``_SpecError`` into a
ValidationError. This module must not import :mod:`aifab.control.spec` (that would be a cycle).
"""

from __future__ import annotations

import difflib
import math
import re
import shlex
from collections.abc import Mapping
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Final, NoReturn

import yaml

from aifab.core.errors import ValidationError
from aifab.core.resources import GPU_MILLI, format_gpus
from aifab.core.workloads import (
    GpuRequest,
    GpuRequestKind,
    PriorityClass,
    TopologyConstraint,
    TopologyMode,
)

# Public constants, re-exported by aifab.control.spec (the validators below need them here).
MAX_NAME_LENGTH: Final = 63  # a DNS label, and the width of the name columns in the database
RESERVED_ENV_PREFIX: Final = "AIFAB_"  # set by the control plane (see aifab.runtime)

# Integers beyond 2**53 do not survive a trip through JSON (JavaScript clients, float columns).
_MAX_NUMBER: Final = 2**53

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


class _SpecError(Exception):
    """A problem at a structured path; turned into a ValidationError at the public boundary."""

    def __init__(self, path: _Path, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _fail(path: _Path, message: str) -> NoReturn:
    raise _SpecError(path, message)


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
