"""The control plane's settings: one typed object built at start-up and passed down.

Sources, later ones winning: defaults, environment variables (``AIFAB_HOME``,
``AIFAB_DATABASE_URL``, ``AIFAB_HOST``, ``AIFAB_PORT``, ``AIFAB_CONFIG``), then explicit overrides
(CLI flags). Node pools come from the configuration file (see :mod:`aifab.control.pools`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aifab.control.pools import PoolConfig, default_pools, load_pools
from aifab.core.errors import ValidationError
from aifab.scheduler import SchedulerConfig

DEFAULT_PORT = 8470


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # Virtual GPUs to declare (None: detect real ones through NVML, 0: none).
    gpus: int | None = None
    gpu_model: str = "virtual-gpu"
    gpu_memory_mib: int = 16384
    schedule_interval: float = 1.0  # seconds between loop passes when nothing wakes them
    busy_interval: float = 0.2  # the same while tasks run (their exits are polled)
    default_grace: float = 30.0
    inventory_interval: float = 5.0  # seconds between asking every backend for its nodes
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    config_file: Path | None = None
    # Pool name -> how it is executed; None: one local pool built from the GPU flags above.
    pool_configs: Mapping[str, PoolConfig] | None = None

    @property
    def pools(self) -> Mapping[str, PoolConfig]:
        if self.pool_configs is not None:
            return self.pool_configs
        return default_pools(self.gpus, self.gpu_model, self.gpu_memory_mib)

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @staticmethod
    def load(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        home = Path(overrides.pop("home", None) or env.get("AIFAB_HOME") or Path.home() / ".aifab")
        home = home.expanduser().resolve()
        url = (
            overrides.pop("database_url", None)
            or env.get("AIFAB_DATABASE_URL")
            or f"sqlite:///{home / 'aifab.db'}"
        )
        s = Settings(home=home, database_url=url, host=env.get("AIFAB_HOST", "127.0.0.1"))
        # None means "not given" (a CLI flag left out): keep what the environment said.
        port = env.get("AIFAB_PORT")
        if port is not None:
            s = replace(s, port=_port(port, "AIFAB_PORT"))
        clean = {k: v for k, v in overrides.items() if v is not None}
        config = clean.pop("config", None) or env.get("AIFAB_CONFIG")
        if config is None and (home / "config.yaml").exists():
            config = home / "config.yaml"
        if config is not None:
            if clean.get("gpus") is not None:
                raise ValidationError(
                    f"declares GPUs without a configuration file only; with {config}, set gpus on a "
                    "local pool there",
                    field="gpus",
                )
            path = Path(config).expanduser().resolve()
            s = replace(s, config_file=path, pool_configs=load_pools(path))
        if "port" in clean:
            clean["port"] = _port(clean["port"], "port")
        if clean.get("gpus") is not None and int(clean["gpus"]) < 0:
            raise ValidationError("must be 0 or more", field="gpus")
        return replace(s, **clean)


def _port(value: Any, name: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValidationError(f"not a port number: {value!r}", field=name) from None
    if not 0 < port < 65536:
        raise ValidationError(f"must be between 1 and 65535, got {port}", field=name)
    return port
