"""Platform commands: server, login, apply, run, ps, describe, logs, cancel, projects, nodes, admin.

Everything but ``server`` talks to the API through :class:`aifab.client.http.Client`. The CLI's
own config (server URL and token) lives in ``$AIFAB_HOME/cli.json``; ``AIFAB_URL`` and
``AIFAB_TOKEN`` override it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from aifab.client.http import ApiError, Client

if TYPE_CHECKING:
    from rich.console import Console

# Every command here but ``server`` is a thin client: it imports no more than it needs (rich,
# yaml, the spec parser, the scheduler behind the server's settings are imported where used), so
# that `aifab ps` starts in a fraction of a second.
DEFAULT_PORT = 8470  # = aifab.control.settings.DEFAULT_PORT (a test keeps them equal)


class _LazyConsole:
    """A rich Console made on first use."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return getattr(self._console, name)


console = cast("Console", _LazyConsole())
err = cast("Console", _LazyConsole(stderr=True))

Output = Annotated[str, typer.Option("--output", "-o", help="table or json")]


def _home() -> Path:
    return Path(os.environ.get("AIFAB_HOME") or Path.home() / ".aifab").expanduser()


def _config() -> dict[str, Any]:
    path = _home() / "cli.json"
    cfg: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    cfg["url"] = os.environ.get("AIFAB_URL") or cfg.get("url") or f"http://127.0.0.1:{DEFAULT_PORT}"
    cfg["token"] = os.environ.get("AIFAB_TOKEN") or cfg.get("token")
    return cfg


@contextmanager
def _client() -> Iterator[Client]:
    cfg = _config()
    try:
        with Client(cfg["url"], cfg["token"]) as c:
            yield c
    except ApiError as exc:
        where = f" ({exc.field})" if exc.field else ""
        err.print(f"[red]error[/red]{where}: {exc.message}")
        raise typer.Exit(1) from None


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error[/red]: {message}")
    return typer.Exit(2)


def _emit(
    rows: list[dict[str, Any]], output: str, columns: list[tuple[str, str]], plain: bool = False
) -> None:
    """Rows as JSON, or as a table: a rich one, or with ``plain`` (listings that may have
    thousands of rows, like `aifab ps`) aligned columns as kubectl and squeue print them."""
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    if output != "table":
        raise _fail(f"--output must be table or json, got {output!r}")
    cells = [["" if row.get(k) is None else str(row.get(k)) for k, _ in columns] for row in rows]
    if plain:
        _plain_table([title for _, title in columns], cells)
        return
    from rich.table import Table

    table = Table(show_edge=False)
    for _, title in columns:
        table.add_column(title)
    for line in cells:
        table.add_row(*line)
    console.print(table)


def _plain_table(titles: list[str], cells: list[list[str]]) -> None:
    """Columns padded to their widest cell, three spaces apart. On a terminal the last column is
    cut to its width (as ps(1) cuts COMMAND); piped, nothing is cut."""
    widths = [max([len(t), *(len(c[i]) for c in cells)]) for i, t in enumerate(titles)]
    room = None
    if sys.stdout.isatty():
        room = max(10, shutil.get_terminal_size().columns - sum(w + 3 for w in widths[:-1]))
    out = []
    for line in [titles, *cells]:
        text = "   ".join(c.ljust(w) for c, w in zip(line[:-1], widths[:-1], strict=True))
        last = line[-1] if room is None or len(line[-1]) <= room else line[-1][: room - 1] + "…"
        out.append(f"{text}   {last}".rstrip())
    sys.stdout.write("\n".join(out) + "\n")


# ----- server and login ---------------------------------------------------------------------
def server_command(
    gpus: Annotated[
        int | None, typer.Option(help="Declare this many virtual GPUs (default: detect with NVML).")
    ] = None,
    gpu_model: Annotated[str, typer.Option(help="Model name of declared GPUs.")] = "virtual-gpu",
    gpu_memory_mib: Annotated[int, typer.Option(help="Memory of each declared GPU.")] = 16384,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Configuration file naming the node pools and their backends (docs/pools.md)."),
    ] = None,
) -> None:
    """Run the aifab control plane on this machine (store, scheduler loops, API)."""
    from aifab.control.server import serve
    from aifab.control.settings import Settings
    from aifab.core.errors import AifabError

    try:
        settings = Settings.load(
            gpus=gpus,
            gpu_model=gpu_model,
            gpu_memory_mib=gpu_memory_mib,
            port=port,
            host=host,
            config=config,
        )
    except AifabError as exc:
        raise _fail(str(exc)) from None
    serve(settings)


def login_command(
    url: Annotated[str | None, typer.Option(help="Server URL.")] = None,
    token: Annotated[
        str | None,
        typer.Option(help="API token (default: the local admin token, if this machine runs the server)."),
    ] = None,
) -> None:
    """Store the server URL and a token for the CLI."""
    home = _home()
    if token is None:
        local = home / "admin.token"
        if not local.exists():
            raise _fail("no --token given and no local admin token found")
        token = local.read_text().strip()
    url = url or f"http://127.0.0.1:{DEFAULT_PORT}"
    with Client(url, token) as c:
        try:
            me = c.whoami()
        except ApiError as exc:
            raise _fail(f"login failed: {exc.message}") from None
    home.mkdir(parents=True, exist_ok=True)
    path = home / "cli.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
    console.print(f"logged in to {url} as [bold]{me['name']}[/bold]{' (admin)' if me['admin'] else ''}")


# ----- workloads ----------------------------------------------------------------------------
def apply_command(
    file: Annotated[Path, typer.Option("--file", "-f", help="Workload spec (YAML); - for stdin.")],
    output: Output = "table",
) -> None:
    """Submit the workload described in a YAML file."""
    from aifab.control.spec import parse_spec
    from aifab.core.errors import AifabError

    text = sys.stdin.read() if str(file) == "-" else _read(file)
    try:
        spec = parse_spec(text, source=str(file)).to_dict()
    except AifabError as exc:
        raise _fail(str(exc)) from None
    spec.setdefault("workdir", str(file.parent.resolve()) if str(file) != "-" else os.getcwd())
    if spec.get("workdir") in (".", ""):
        spec["workdir"] = str(file.parent.resolve()) if str(file) != "-" else os.getcwd()
    with _client() as c:
        _submitted(c.submit(spec), output)


def _read(file: Path) -> str:
    try:
        return file.read_text()
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror}") from None


def run_command(
    command: Annotated[list[str], typer.Argument(help="The command to run (after --).")],
    project: Annotated[str, typer.Option("--project", "-p", help="Project to run in.")],
    gpus: Annotated[
        str | None, typer.Option(help="Whole GPUs (2), a fraction (0.5) or GPU memory (8GiB).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Workload name (default: from the command).")] = None,
    cpu: Annotated[float | None, typer.Option(help="CPU cores.")] = None,
    memory: Annotated[str | None, typer.Option(help="Memory, e.g. 4GiB.")] = None,
    priority: Annotated[str | None, typer.Option(help="Priority class.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Tasks in the gang.")] = None,
    output: Output = "table",
) -> None:
    """Quick path: run a command as a job (`aifab run --gpus 0.5 -p vision -- python train.py`)."""
    from aifab.control.spec import quick_spec
    from aifab.core.errors import AifabError

    default = "".join(ch if ch.isalnum() else "-" for ch in Path(command[0]).name.lower()).strip("-") or "job"
    try:
        spec = quick_spec(
            name=name or default[:40],
            project=project,
            command=list(command),
            gpus=gpus,
            cpu=cpu,
            memory=memory,
            priority=priority,
            replicas=replicas,
        ).to_dict()
    except AifabError as exc:
        raise _fail(str(exc)) from None
    spec["workdir"] = os.getcwd()
    with _client() as c:
        _submitted(c.submit(spec), output)


def _submitted(w: dict[str, Any], output: str) -> None:
    if output == "json":
        typer.echo(json.dumps(w, indent=2))
    else:
        console.print(
            f"submitted [bold]{w['id']}[/bold] ({w['name']}) to project {w['project']}: {w['phase']}"
        )


PS_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("project", "PROJECT"),
    ("phase", "PHASE"),
    ("gpus", "GPUS"),
    ("replicas", "TASKS"),
    ("priority", "PRIORITY"),
    ("attempt", "ATTEMPT"),
    ("age", "AGE"),
    ("reason", "REASON"),
]


def ps_command(
    project: Annotated[str | None, typer.Option("--project", "-p")] = None,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Include finished workloads.")] = False,
    output: Output = "table",
) -> None:
    """List workloads (active ones unless --all)."""
    phases = None if all_ else ["pending", "scheduled", "running", "preempted"]
    with _client() as c:
        rows = c.workloads(project, phases)
    now = time.time()
    for r in rows:
        r["age"] = _age(now - r["submit_time"])
    _emit(rows, output, PS_COLUMNS, plain=True)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def describe_command(
    ref: Annotated[str, typer.Argument(help="Workload id or name.")], output: Output = "table"
) -> None:
    """Spec, placements, attempts, events, lost work, and why it is pending."""
    import yaml

    with _client() as c:
        d = c.describe(ref)
    if output == "json":
        typer.echo(json.dumps(d, indent=2))
        return
    console.print(f"[bold]{d['id']}[/bold] {d['name']} — project {d['project']} — [bold]{d['phase']}[/bold]")
    if d.get("reason"):
        console.print(f"  why: {d['reason']}")
    console.print(
        f"  attempts: {d['attempt']}, failures: {d['failures']}, lost work: {d['lost_gpu_seconds'] / 3600:.3f} GPU-h"
    )
    console.print(f"  checkpoint dir: {d['checkpoint_dir']}")
    console.print("  spec:")
    console.print("    " + yaml.safe_dump(d["spec"], sort_keys=False).replace("\n", "\n    ").rstrip())
    if d["tasks"]:
        _emit(
            d["tasks"],
            "table",
            [
                ("attempt", "ATTEMPT"),
                ("task", "TASK"),
                ("node", "NODE"),
                ("devices", "GPUS"),
                ("gpu_milli", "MILLI"),
                ("state", "STATE"),
                ("exit_code", "EXIT"),
            ],
        )
    for e in d["events"]:
        stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        console.print(f"  {stamp} {e['kind']:<10} {e['message']}")


def logs_command(
    ref: Annotated[str, typer.Argument(help="Workload id or name.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until it ends.")] = False,
    task: Annotated[int, typer.Option(help="Task index in the gang.")] = 0,
    attempt: Annotated[int | None, typer.Option(help="Attempt (default: the latest).")] = None,
) -> None:
    """Print a task's output (stdout and stderr)."""
    offset = 0
    with _client() as c:
        while True:
            chunk = c.logs(ref, task, offset, attempt)
            if chunk["text"]:
                sys.stdout.write(chunk["text"])
                sys.stdout.flush()
            offset = chunk["offset"]
            if not follow or (chunk["done"] and not chunk["text"]):
                return
            if not chunk["text"]:
                time.sleep(0.5)


def cancel_command(ref: Annotated[str, typer.Argument(help="Workload id or name.")]) -> None:
    """Cancel a workload (running tasks get SIGTERM, then SIGKILL after their grace period)."""
    with _client() as c:
        w = c.cancel(ref)
    console.print(f"{w['id']}: {'cancelled' if w['phase'] == 'cancelled' else 'cancelling'}")


def projects_command(output: Output = "table") -> None:
    """Deserved GPUs, fair share, in use and pending per project."""
    with _client() as c:
        rows = c.projects()
    _emit(
        rows,
        output,
        [
            ("name", "PROJECT"),
            ("parent", "DEPARTMENT"),
            ("deserved_gpus", "DESERVED"),
            ("limit_gpus", "LIMIT"),
            ("fair_share_gpus", "FAIR SHARE"),
            ("in_use_gpus", "IN USE"),
            ("pending", "PENDING"),
        ],
    )


def nodes_command(output: Output = "table") -> None:
    """Nodes with their pool, backend and GPUs."""
    with _client() as c:
        rows = c.nodes()
    _emit(
        rows,
        output,
        [
            ("name", "NODE"),
            ("pool", "POOL"),
            ("backend", "BACKEND"),
            ("state", "STATE"),
            ("gpus", "GPUS"),
            ("gpu_model", "MODEL"),
            ("gpus_in_use", "GPUS IN USE"),
            ("cpu", "CPU"),
            ("virtual_gpus", "VIRTUAL"),
            ("schedulable", "SCHEDULABLE"),
        ],
    )


# ----- admin --------------------------------------------------------------------------------
admin_app = typer.Typer(help="Administration: projects, departments, users and tokens.", no_args_is_help=True)


@admin_app.command("project")
def admin_project(
    name: str,
    deserved: Annotated[float, typer.Option(help="Deserved (guaranteed) GPUs.")] = 0.0,
    department: Annotated[str | None, typer.Option(help="Parent department.")] = None,
    weight: Annotated[float, typer.Option(help="Over-quota weight.")] = 1.0,
    limit: Annotated[float | None, typer.Option(help="GPU limit.")] = None,
    priority: Annotated[int, typer.Option(help="Queue priority for idle GPUs.")] = 0,
    node_pool: Annotated[
        str | None, typer.Option(help="Pool its workloads run in unless their spec names one.")
    ] = None,
    max_runtime: Annotated[float | None, typer.Option(help="Seconds any of its workloads may run.")] = None,
    min_runtime: Annotated[
        float | None, typer.Option(help="Seconds a workload runs before it may be preempted.")
    ] = None,
    retries: Annotated[int | None, typer.Option(help="Retries a failed workload gets (at least).")] = None,
) -> None:
    """Create a project (or a department: a queue that gets projects under it)."""
    policies = {
        "node_pool": node_pool,
        "max_runtime": max_runtime,
        "min_runtime": min_runtime,
        "retries": retries,
    }
    with _client() as c:
        p = c.create_project(
            name=name,
            parent=department,
            deserved_gpus=deserved,
            over_quota_weight=weight,
            limit_gpus=limit,
            priority=priority,
            **{k: v for k, v in policies.items() if v is not None},
        )
    console.print(f"created {p['name']} (deserved {p['deserved_gpus']} GPUs)")


@admin_app.command("user")
def admin_user(
    name: str,
    admin: Annotated[bool, typer.Option(help="Make the user an admin.")] = False,
    member: Annotated[
        list[str] | None, typer.Option(help="Project the user is a member of (repeat).")
    ] = None,
    viewer: Annotated[list[str] | None, typer.Option(help="Project the user may only read (repeat).")] = None,
) -> None:
    """Create a user with roles; prints their token once."""
    roles = {p: "member" for p in member or []} | {p: "viewer" for p in viewer or []}
    with _client() as c:
        u = c.create_user(name, admin, roles)
    console.print(f"created user {u['name']}; token (shown once): {u['token']}")


@admin_app.command("revoke")
def admin_revoke(name: str) -> None:
    """Revoke every token of a user (they must be given a new one to log in again)."""
    with _client() as c:
        r = c.revoke_tokens(name)
    console.print(f"revoked {r['revoked']} token(s) of {r['name']}")


@admin_app.command("audit")
def admin_audit(limit: int = 50, output: Output = "table") -> None:
    """The audit log, newest first."""
    with _client() as c:
        rows = c.audit(limit)
    for r in rows:
        r["when"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
    _emit(
        rows,
        output,
        [("when", "TIME"), ("actor", "WHO"), ("action", "ACTION"), ("target", "TARGET"), ("source", "FROM")],
    )


def register(app: typer.Typer) -> None:
    commands: list[tuple[str, Callable[..., None]]] = [
        ("server", server_command),
        ("login", login_command),
        ("apply", apply_command),
        ("ps", ps_command),
        ("describe", describe_command),
        ("logs", logs_command),
        ("cancel", cancel_command),
        ("projects", projects_command),
        ("nodes", nodes_command),
    ]
    for name, fn in commands:
        app.command(name)(fn)
    app.command("run", context_settings={"allow_interspersed_args": False})(run_command)
    app.add_typer(admin_app, name="admin")
