"""A real ``aifab server`` process for benchmarks: started on a free port with its own
``AIFAB_HOME``, reached over HTTP with the bootstrap admin token, stopped by process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

AIFAB = str(Path(sys.executable).parent / "aifab")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``aifab server ARGS`` (default: four virtual GPUs) until :meth:`stop`."""

    def __init__(self, home: Path, args: tuple[str, ...] = ("--gpus", "4")) -> None:
        self.home, self.port = home, free_port()
        self.env = {**os.environ, "AIFAB_HOME": str(home), "AIFAB_URL": f"http://127.0.0.1:{self.port}"}
        log = open(home / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [AIFAB, "server", *args, "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)
        self.token = (home / "admin.token").read_text().strip()
        self.env["AIFAB_TOKEN"] = self.token
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.http.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
