"""Workload specs: what is accepted, what the scheduler gets, and how refusals read."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifab.control.spec import (
    JobSpec,
    parse_duration_seconds,
    parse_memory_mib,
    parse_spec,
    quick_spec,
    spec_from_dict,
)
from aifab.core.errors import ValidationError
from aifab.core.workloads import (
    GpuRequest,
    PriorityClass,
    TopologyConstraint,
    TopologyMode,
    WorkloadPhase,
)

BASE = """\
kind: job
name: mnist-a
project: vision
command: ["python", "train.py"]
"""


def _spec(extra: str = "") -> JobSpec:
    return parse_spec(BASE + extra, "job.yaml")


def _base_dict(**fields: Any) -> dict[str, Any]:
    return {
        "kind": "job",
        "name": "mnist-a",
        "project": "vision",
        "command": ["python", "train.py"],
        **fields,
    }


# ----------------------------------------------------------------------------------- valid specs

VALID = [
    pytest.param(
        "",
        {
            "tasks": 1,
            "gpu": GpuRequest.none(),
            "cpu_milli": 1000,
            "memory_mib": 1024,
            "min_available": 1,
            "priority": 50,
            "preemptible": True,
            "gpu_models": frozenset(),
            "topology": None,
        },
        id="defaults",
    ),
    pytest.param(
        "resources: {gpus: 2, cpu: 8, memory: 64GiB}\n",
        {"gpu": GpuRequest.whole(2), "cpu_milli": 8000, "memory_mib": 65536},
        id="whole",
    ),
    pytest.param(
        "resources: {gpus: 0.5, cpu: 0.5, memory: 512MiB}\n",
        {"gpu": GpuRequest.fraction(0.5), "cpu_milli": 500, "memory_mib": 512},
        id="fraction",
    ),
    pytest.param(
        "resources: {gpus: 20GiB, memory: 4G}\n",
        {"gpu": GpuRequest.memory(20480), "memory_mib": 4096},
        id="gpu-memory",
    ),
    pytest.param(
        "resources: {gpus: '8000MiB', cpu: 250m, memory: 2048}\n",
        {"gpu": GpuRequest.memory(8000), "cpu_milli": 250, "memory_mib": 2048},
        id="mib-and-millicores",
    ),
    pytest.param(
        "resources: {gpus: 1}\nreplicas: 2\nmin_available: 1\n",
        {"tasks": 2, "min_available": 1},
        id="gang-min-available",
    ),
    pytest.param("replicas: 4\n", {"tasks": 4, "min_available": 4}, id="gang-defaults-to-all"),
    pytest.param(
        "topology: {level: rack, mode: preferred}\n",
        {"topology": TopologyConstraint("rack", TopologyMode.PREFERRED)},
        id="topology-preferred",
    ),
    pytest.param(
        "topology: {level: node}\n",
        {"topology": TopologyConstraint("node", TopologyMode.REQUIRED)},
        id="topology-default-mode",
    ),
    pytest.param(
        "resources: {gpus: 1, gpu_model: [A100-80GB, H100-80GB]}\n",
        {"gpu_models": frozenset({"A100-80GB", "H100-80GB"})},
        id="gpu-model-list",
    ),
    pytest.param(
        "resources: {gpus: 1, gpu_model: A100-80GB}\n",
        {"gpu_models": frozenset({"A100-80GB"})},
        id="gpu-model-string",
    ),
    pytest.param(
        "priority: inference\n",
        {"priority": 125, "preemptible": False, "priority_class": "inference"},
        id="inference",
    ),
    pytest.param(
        "priority: batch\npreemptible: false\n",
        {"priority": 25, "preemptible": False},
        id="opt-out-of-preemption",
    ),
    pytest.param(
        "min_runtime: 10m\ncheckpoint_interval: 1800\n",
        {"min_runtime": 600.0, "checkpoint_interval": 1800.0},
        id="times",
    ),
]


@pytest.mark.parametrize(("extra", "expected"), VALID)
def test_valid_spec_builds_the_expected_workload(extra: str, expected: dict[str, Any]) -> None:
    workload = _spec(extra).to_workload("w-1", submit_time=12.5)
    assert workload.id == "w-1"
    assert workload.queue == "vision"
    assert workload.submit_time == 12.5
    for key, value in expected.items():
        if key == "tasks":
            assert len(workload.tasks) == value
        elif key in ("gpu", "cpu_milli", "memory_mib"):
            assert {getattr(t, key) for t in workload.tasks} == {value}, key
        else:
            assert getattr(workload, key) == value, key


def test_every_field_at_once() -> None:
    spec = parse_spec(
        """\
kind: job
name: llm-ft-7
project: nlp
command: torchrun --nproc-per-node 8 'train script.py'
workdir: /data/run
env: {DEBUG: true, SEED: 42, LR: 0.1, NAME: x}
resources: {gpus: 8, gpu_model: H100-80GB, cpu: 32, memory: 512Gi}
replicas: 4
min_available: 2
priority: train
preemptible: true
topology: {level: rack}
max_runtime: 1d
min_runtime: 1h30m
retries: 3
checkpoint_grace: 2m
checkpoint_interval: 30m
"""
    )
    assert spec.command == ("torchrun", "--nproc-per-node", "8", "train script.py")
    assert dict(spec.env) == {"DEBUG": "true", "SEED": "42", "LR": "0.1", "NAME": "x"}
    assert spec.resources.memory_mib == 512 * 1024
    assert (spec.max_runtime, spec.min_runtime, spec.checkpoint_grace) == (86400.0, 5400.0, 120.0)
    assert spec.retries == 3
    assert spec.workdir == "/data/run"


def test_to_workload_overrides_and_class_table() -> None:
    spec = _spec("priority: train\n")
    running = spec.to_workload(
        "w", 0.0, phase=WorkloadPhase.RUNNING, start_time=5.0, last_checkpoint_time=9.0
    )
    assert (running.phase, running.start_time, running.last_checkpoint_time) == (
        WorkloadPhase.RUNNING,
        5.0,
        9.0,
    )
    custom = {"train": PriorityClass("train", 70, preemptible=True)}
    assert spec.to_workload("w", 0.0, classes=custom).priority == 70
    with pytest.raises(ValidationError) as info:
        spec.to_workload("w", 0.0, classes={"batch": PriorityClass("batch", 1, True)})
    assert info.value.field == "priority"
    assert "batch" in info.value.message


def test_quick_spec_goes_through_the_same_validation() -> None:
    spec = quick_spec(
        "a", "vision", ["python", "train.py"], gpus="0.5", cpu=2, memory="4GiB", priority="batch"
    )
    assert spec.resources.gpu == GpuRequest.fraction(0.5)
    assert (spec.resources.cpu_milli, spec.resources.memory_mib, spec.priority) == (2000, 4096, "batch")
    assert quick_spec("a", "p", ["x"], gpus="2").resources.gpu == GpuRequest.whole(2)
    assert quick_spec("a", "p", ["x"], gpus="20GiB").resources.gpu == GpuRequest.memory(20480)
    assert quick_spec("a", "p", ["x"]) == spec_from_dict(_base_dict(name="a", project="p", command=["x"]))
    with pytest.raises(ValidationError) as info:
        quick_spec("a", "p", ["x"], gpus="1.5")
    assert info.value.field == "resources.gpus"


def test_null_means_unset_only_where_unset_is_a_default() -> None:
    spec = spec_from_dict(_base_dict(topology=None, max_runtime=None, min_available=None, preemptible=None))
    assert (spec.topology, spec.max_runtime, spec.min_available, spec.preemptible) == (None, None, 1, None)
    with pytest.raises(ValidationError) as info:
        spec_from_dict(_base_dict(replicas=None))
    assert info.value.field == "replicas"


# ------------------------------------------------------------------------------------ bad specs

BAD = [
    pytest.param(BASE + "env: [oops\n", None, "started at line 5, column 6", id="malformed-yaml-unclosed"),
    pytest.param(
        BASE + "resources:\n  gpus: 1\n cpu: 2\n",
        None,
        "job.yaml:7:2: invalid YAML",
        id="malformed-yaml-indent",
    ),
    pytest.param(BASE + "env:\n\tA: b\n", None, "job.yaml:6:1: invalid YAML", id="malformed-yaml-tab"),
    pytest.param(BASE + "replicas: 1\nreplicas: 2\n", None, "duplicate key 'replicas'", id="duplicate-key"),
    pytest.param("", None, "empty", id="empty-document"),
    pytest.param("- kind: job\n", None, "must be a mapping", id="not-a-mapping"),
    pytest.param(BASE + "gpus: 1\n", "gpus", "unknown field", id="unknown-top-level-field"),
    pytest.param(
        BASE + "resources: {gpu: 1}\n", "resources.gpu", "did you mean gpus?", id="unknown-nested-field"
    ),
    pytest.param(
        BASE + "topology: {levle: node}\n",
        "topology.levle",
        "did you mean level?",
        id="unknown-topology-field",
    ),
    pytest.param(BASE + "resources: {gpus: -1}\n", "resources.gpus", ">= 0", id="gpus-negative"),
    pytest.param(BASE + "resources: {gpus: 1.5}\n", "resources.gpus", "1.5 GPUs", id="gpus-1.5"),
    pytest.param(BASE + "resources: {gpus: 0.0}\n", "resources.gpus", "gpus: 0 for no GPU", id="gpus-0.0"),
    pytest.param(
        BASE + "resources: {gpus: 0.0001}\n", "resources.gpus", "steps of 0.001", id="gpus-too-fine"
    ),
    pytest.param(BASE + "resources: {gpus: 12XB}\n", "resources.gpus", "'12XB'", id="gpus-bad-unit"),
    pytest.param(BASE + "resources: {gpus: true}\n", "resources.gpus", "boolean", id="gpus-bool"),
    pytest.param(
        BASE + "resources: {gpu_model: A100}\n", "resources.gpu_model", "set gpus", id="model-without-gpu"
    ),
    pytest.param(BASE + "resources: {cpu: 0}\n", "resources.cpu", "> 0", id="cpu-zero"),
    pytest.param(BASE + "resources: {cpu: -2}\n", "resources.cpu", "> 0", id="cpu-negative"),
    pytest.param(
        BASE + "resources: {memory: 12XB}\n", "resources.memory", "unknown unit 'XB'", id="memory-bad-unit"
    ),
    pytest.param(BASE + "resources: {memory: .nan}\n", "resources.memory", "finite", id="memory-nan"),
    pytest.param(BASE + "replicas: 0\n", "replicas", ">= 1", id="replicas-zero"),
    pytest.param(BASE + "replicas: 2.5\n", "replicas", "whole number", id="replicas-fractional"),
    pytest.param(
        BASE + "replicas: 2\nmin_available: 3\n",
        "min_available",
        "between 1 and replicas (2)",
        id="min-available-too-big",
    ),
    pytest.param(
        BASE + "priority: urgent\n", "priority", "inference, interactive, train, batch", id="unknown-priority"
    ),
    pytest.param(
        BASE + "priority: inference\npreemptible: true\n",
        "preemptible",
        "priority class inference is not preemptible",
        id="preemptible-inference",
    ),
    pytest.param(BASE.replace("kind: job", "kind: service"), "kind", "known kinds: job", id="kind-service"),
    pytest.param(BASE.replace("kind: job\n", ""), "kind", "is required", id="kind-missing"),
    pytest.param(BASE.replace("mnist-a", "Mnist-A"), "name", "for example 'mnist-a'", id="name-uppercase"),
    pytest.param(BASE.replace("mnist-a", "mnist_a"), "name", "lowercase letters", id="name-underscore"),
    pytest.param(BASE.replace("mnist-a", "a" * 64), "name", "63 characters", id="name-too-long"),
    pytest.param(BASE.replace("project: vision\n", ""), "project", "is required", id="project-missing"),
    pytest.param(
        BASE + "env: {1BAD: x}\n", "env.1BAD", "not a valid environment variable name", id="env-key"
    ),
    pytest.param(
        BASE + "env: {AIFAB_ATTEMPT: '3'}\n", "env.AIFAB_ATTEMPT", "set by aifab", id="env-reserved"
    ),
    pytest.param(BASE + "env: {A: null}\n", "env.A", "null", id="env-null"),
    pytest.param(
        BASE.replace('["python", "train.py"]', "[python, 0.1]"),
        "command[1]",
        "must be a string",
        id="command-number",
    ),
    pytest.param(
        BASE.replace('["python", "train.py"]', "[]"), "command", "must not be empty", id="command-empty"
    ),
    pytest.param(
        BASE.replace('["python", "train.py"]', "'python \"x'"),
        "command",
        "No closing quotation",
        id="command-quote",
    ),
    pytest.param(BASE + "max_runtime: 2 hours\n", "max_runtime", "not a duration", id="duration-words"),
    pytest.param(BASE + "max_runtime: 0\n", "max_runtime", "> 0", id="max-runtime-zero"),
    pytest.param(
        BASE + "max_runtime: 1h\nmin_runtime: 2h\n", "min_runtime", "exceeds max_runtime", id="min-over-max"
    ),
    pytest.param(BASE + "checkpoint_grace: -1\n", "checkpoint_grace", ">= 0", id="grace-negative"),
    pytest.param(BASE + "retries: -1\n", "retries", ">= 0", id="retries-negative"),
    pytest.param(
        BASE + "topology: {level: node, mode: maybe}\n",
        "topology.mode",
        "required, preferred",
        id="topology-mode",
    ),
    pytest.param(BASE + "preemptible: yes please\n", "preemptible", "true or false", id="preemptible-string"),
]


@pytest.mark.parametrize(("text", "field", "fragment"), BAD)
def test_bad_spec_is_refused_with_field_and_message(text: str, field: str | None, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(text, "job.yaml")
    assert info.value.field == field
    assert fragment in info.value.message


def test_semantic_errors_name_the_yaml_line() -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(BASE + "resources:\n  cpu: 1\n  gpus: 1.5\n", "job.yaml")
    assert "(job.yaml, line 7)" in info.value.message
    assert str(info.value).startswith("resources.gpus: ")


def test_spec_from_dict_errors_match_parse_spec() -> None:
    with pytest.raises(ValidationError) as info:
        spec_from_dict(_base_dict(resources={"gpus": 1, "memry": "4GiB"}))
    assert info.value.field == "resources.memry"
    assert "did you mean memory?" in info.value.message


# ---------------------------------------------------------------------------------- size parsers


@pytest.mark.parametrize(
    ("value", "mib"),
    [
        ("512MiB", 512),
        ("4GiB", 4096),
        ("4G", 4096),
        ("4gb", 4096),
        ("1.5Gi", 1536),
        ("1TiB", 1 << 20),
        ("512KiB", 1),
        (2048, 2048),
        ("2048", 2048),
        (1.5, 2),
    ],
)
def test_parse_memory_mib(value: object, mib: int) -> None:
    assert parse_memory_mib(value) == mib


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (3600, 3600.0),
        ("2h", 7200.0),
        ("30m", 1800.0),
        ("45s", 45.0),
        ("1h30m", 5400.0),
        ("1.5d", 129600.0),
        ("90", 90.0),
        (0, 0.0),
    ],
)
def test_parse_duration_seconds(value: object, seconds: float) -> None:
    assert parse_duration_seconds(value) == seconds


@pytest.mark.parametrize("value", ["12XB", "", "GiB", "-1GiB", 0, True, None, [1], math.inf])
def test_parse_memory_mib_refuses(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        parse_memory_mib(value, field="resources.memory")
    assert info.value.field == "resources.memory"


@pytest.mark.parametrize("value", ["2 hours", "h", "", "-5s", -1, math.nan, False])
def test_parse_duration_seconds_refuses(value: object) -> None:
    with pytest.raises(ValidationError):
        parse_duration_seconds(value)


# ---------------------------------------------------------------------------------- round trips


def test_round_trip_of_a_full_spec() -> None:
    spec = _spec(
        "resources: {gpus: 20GiB, gpu_model: [B, A]}\nreplicas: 3\ntopology: {level: node}\nmax_runtime: 1h\n"
    )
    data = spec.to_dict()
    json.dumps(data)  # JSON-able
    assert spec_from_dict(data) == spec
    assert parse_spec(yaml.safe_dump(data)) == spec
    assert data["resources"]["gpu_model"] == ["B", "A"]


_LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
_WORD = st.from_regex(r"[A-Za-z0-9._/-]{1,20}", fullmatch=True)
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_ENV_KEY = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(
    lambda k: not k.startswith("AIFAB_")
)
_SECONDS = st.one_of(st.integers(1, 10**6), st.sampled_from(["2h", "30m", "45s", "1h30m", "0.5d", "90"]))


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    data = _base_dict(name=draw(_LABEL), project=draw(_WORD))
    data["command"] = draw(st.lists(_TEXT, min_size=1, max_size=4).filter(lambda argv: argv[0] != "") | _WORD)
    gpus = draw(
        st.one_of(
            st.integers(0, 16),
            st.integers(1, 999).map(lambda m: m / 1000),
            st.integers(1, 200_000).map(lambda m: f"{m}MiB"),
            st.sampled_from(["20GiB", "4G", "0.25", "2"]),
        )
    )
    resources: dict[str, Any] = {"gpus": gpus}
    if gpus not in (0, "0") and draw(st.booleans()):
        resources["gpu_model"] = draw(st.lists(_WORD, min_size=1, max_size=3) | _WORD)
    if draw(st.booleans()):
        resources["cpu"] = draw(st.integers(1, 64) | st.integers(1, 64_000).map(lambda m: f"{m}m"))
    if draw(st.booleans()):
        resources["memory"] = draw(st.integers(1, 10**6) | st.sampled_from(["512MiB", "4GiB", "1.5G"]))
    data["resources"] = resources
    replicas = draw(st.integers(1, 8))
    data["replicas"] = replicas
    optional: dict[str, st.SearchStrategy[Any]] = {
        "workdir": _WORD,
        "env": st.dictionaries(_ENV_KEY, _TEXT | st.integers() | st.booleans(), max_size=3),
        "min_available": st.integers(1, replicas),
        "priority": st.sampled_from(["train", "batch"]),
        "preemptible": st.booleans(),
        "topology": st.fixed_dictionaries(
            {"level": _WORD}, optional={"mode": st.sampled_from(["required", "preferred"])}
        ),
        "max_runtime": st.just(10**7),
        "min_runtime": _SECONDS,
        "retries": st.integers(0, 10),
        "checkpoint_grace": st.integers(0, 600),
        "checkpoint_interval": _SECONDS,
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            data[key] = draw(strategy)
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs())
def test_random_valid_specs_round_trip(data: dict[str, Any]) -> None:
    spec = spec_from_dict(data)
    canonical = spec.to_dict()
    assert json.loads(json.dumps(canonical)) == canonical
    assert spec_from_dict(canonical) == spec
    assert spec_from_dict(canonical).to_dict() == canonical
    assert parse_spec(yaml.safe_dump(canonical)) == spec
    workload = spec.to_workload("w", 0.0)
    assert len(workload.tasks) == spec.replicas


_FIELDS = (
    "kind",
    "name",
    "project",
    "command",
    "resources",
    "gpus",
    "cpu",
    "memory",
    "env",
    "replicas",
    "min_available",
    "topology",
    "level",
    "mode",
    "priority",
    "preemptible",
    "max_runtime",
    "gpu_model",
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        ["job", "1GiB", "0.5", "-1", "12XB", "2h", "500m", "train", "inference", "node", "a b", "\x00"]
    ),
)
_JUNK = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


def _accepts_or_validation_error(call: Any, *args: Any) -> None:
    with contextlib.suppress(ValidationError):  # the only acceptable failure
        call(*args)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_JUNK)
def test_junk_never_raises_anything_but_validation_error(junk: Any) -> None:
    _accepts_or_validation_error(spec_from_dict, junk)
    _accepts_or_validation_error(parse_spec, yaml.safe_dump(junk))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs(), st.sampled_from(_FIELDS), _JUNK)
def test_one_junk_field_in_a_valid_spec(data: dict[str, Any], key: str, junk: Any) -> None:
    # Junk deep inside an otherwise valid spec exercises every field's validator.
    if key in ("gpus", "cpu", "memory", "gpu_model"):
        data["resources"][key] = junk
    elif key in ("level", "mode"):
        data["topology"] = {"level": "node", key: junk}
    else:
        data[key] = junk
    _accepts_or_validation_error(spec_from_dict, data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_raises_anything_but_validation_error(text: str) -> None:
    _accepts_or_validation_error(parse_spec, text)
