"""``aifab server``: wire settings, store, backend, loops and the API together, then serve."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from aifab.backends.router import PoolRouter
from aifab.control.db import Database
from aifab.control.loops import Controller
from aifab.control.pools import build_backend
from aifab.control.services import auth
from aifab.control.settings import Settings


@dataclass
class Server:
    settings: Settings
    db: Database
    backend: PoolRouter
    controller: Controller
    admin_token: str | None  # set on the first start only

    @property
    def token_file(self) -> Path:
        return self.settings.home / "admin.token"


def build(settings: Settings) -> Server:
    """Open (and migrate) the store, connect every pool's backend, take inventory, create the
    first admin on first start. An engine that cannot be reached yet is reported and retried:
    the server starts with the pools that answer."""
    settings.home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    db.migrate()
    pools = settings.pools
    backend = PoolRouter(
        {name: build_backend(name, cfg, settings.home) for name, cfg in pools.items()},
        kinds={name: cfg.backend for name, cfg in pools.items()},
    )
    controller = Controller(db, backend, settings)
    controller.sync_inventory()
    with db.session() as s:
        token = auth.bootstrap_admin(s)
    server = Server(settings, db, backend, controller, token)
    if token is not None:
        # Readable by this user only: the local CLI and the README's demo log in with it.
        fd = os.open(server.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    return server


def serve(settings: Settings) -> None:
    import uvicorn

    from aifab.api.app import ServerContext, create_app

    server = build(settings)
    if server.admin_token is not None:
        print(f"aifab: first start; admin token (shown once, also in {server.token_file}):", flush=True)
        print(f"  {server.admin_token}", flush=True)
    app = create_app(ServerContext(settings, server.db, server.backend, server.controller))
    stop = threading.Event()
    loop = threading.Thread(target=server.controller.run, args=(stop,), name="aifab-loops", daemon=True)
    loop.start()
    print(f"aifab: serving on {settings.url} (store {settings.database_url})", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        stop.set()
        server.controller.wake.set()
        loop.join(timeout=5)
        server.db.dispose()
