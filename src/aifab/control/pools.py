"""Node pools: which backend executes each pool, read from the server's configuration file.

A configuration file (``aifab server --config FILE``, ``AIFAB_CONFIG``, or ``$AIFAB_HOME/config.yaml``
when it exists) names the pools::

    pools:
      laptop:                 # pool name (nodes of this pool carry it; projects and specs select it)
        backend: local
        gpus: 2               # virtual GPUs; leave out to detect real ones with NVML
      ray:
        backend: ray
        address: 127.0.0.1:6379
      slurm:
        backend: slurm
        partition: gpu
        slurm_conf: /etc/slurm/slurm.conf

Without a file the server has one pool, ``default``, executed by the local backend with the
``--gpus`` / ``--gpu-model`` / ``--gpu-memory-mib`` flags. Errors name the offending field
(``pools.ray.address``) and the file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticError

from aifab.core.errors import ValidationError

if TYPE_CHECKING:
    from aifab.backends.base import Backend

POOL_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class _Pool(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalPool(_Pool):
    backend: Literal["local"]
    gpus: Annotated[int, Field(ge=0)] | None = None
    gpu_model: str = "virtual-gpu"
    gpu_memory_mib: Annotated[int, Field(gt=0)] = 16384
    node_name: str | None = None


class RayPool(_Pool):
    backend: Literal["ray"]
    address: Annotated[str, Field(min_length=1)]
    namespace: str = "aifab"


class SlurmPool(_Pool):
    backend: Literal["slurm"]
    partition: str | None = None
    slurm_conf: str | None = None
    # Slurm's GRES do not say how much memory a GPU has, nor whether a device is real.
    gpu_memory_mib: Annotated[int, Field(gt=0)] = 81920
    virtual_gpus: bool = False
    # What a task asks Slurm for when its spec says nothing (Slurm would give it a whole node).
    default_memory_mib: Annotated[int, Field(gt=0)] = 1024
    python: str | None = None  # the interpreter of the batch script on the nodes (default: the server's)
    # How long a finished job keeps its allocation waiting for the control plane to acknowledge
    # its end, so the task that takes its room is queued in Slurm before it goes (0: never).
    end_hold_s: Annotated[float, Field(ge=0, le=60)] = 1.0


PoolConfig = Annotated[LocalPool | RayPool | SlurmPool, Field(discriminator="backend")]
_POOLS = TypeAdapter(dict[Annotated[str, Field(pattern=POOL_NAME)], PoolConfig])


def default_pools(gpus: int | None, gpu_model: str, gpu_memory_mib: int) -> dict[str, PoolConfig]:
    return {
        "default": LocalPool(backend="local", gpus=gpus, gpu_model=gpu_model, gpu_memory_mib=gpu_memory_mib)
    }


def load_pools(path: Path) -> dict[str, PoolConfig]:
    """The ``pools`` section of a configuration file, validated."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValidationError(
            f"cannot read the configuration file: {exc.strerror}", field=str(path)
        ) from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"pools"}:
        unknown = sorted(set(doc) - {"pools"}) if isinstance(doc, dict) else []
        what = f"unknown field {unknown[0]!r}" if unknown else "must be a mapping with a 'pools' section"
        raise ValidationError(f"{path}: {what}", field=unknown[0] if unknown else None)
    return parse_pools(doc.get("pools"), source=str(path))


def parse_pools(raw: Any, source: str = "config") -> dict[str, PoolConfig]:
    if not isinstance(raw, Mapping) or not raw:
        raise ValidationError(f"{source}: must name at least one pool", field="pools")
    try:
        return _POOLS.validate_python(dict(raw))
    except PydanticError as exc:
        first = exc.errors()[0]
        parts = list(first["loc"])
        if len(parts) > 1 and parts[1] in ("local", "ray", "slurm"):
            del parts[1]  # pydantic names the union member it tried: not a field of the file
        loc = ".".join(str(p) for p in parts)
        raise ValidationError(f"{source}: {first['msg']}", field=f"pools.{loc}" if loc else "pools") from None


def build_backend(pool: str, cfg: PoolConfig, home: Path) -> Backend:
    """The backend that executes ``pool`` (engines are imported only when a pool uses them)."""
    if isinstance(cfg, LocalPool):
        from aifab.backends.local import LocalBackend, detect_inventory

        node = detect_inventory(
            node_name=cfg.node_name, gpus=cfg.gpus, gpu_model=cfg.gpu_model, gpu_memory_mib=cfg.gpu_memory_mib
        )
        return LocalBackend(home, node)
    if isinstance(cfg, RayPool):
        from aifab.backends.ray import RayBackend

        return RayBackend(name=pool, pool=pool, address=cfg.address, namespace=cfg.namespace)
    from aifab.backends.slurm import SlurmBackend

    return SlurmBackend(
        name=pool,
        pool=pool,
        partition=cfg.partition,
        slurm_conf=cfg.slurm_conf,
        state_dir=home / "slurm" / pool,
        gpu_memory_mib=cfg.gpu_memory_mib,
        virtual_gpus=cfg.virtual_gpus,
        default_memory_mib=cfg.default_memory_mib,
        python=cfg.python or sys.executable,
        end_hold_s=cfg.end_hold_s,
    )
