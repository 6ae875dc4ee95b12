"""The REST API: thin routers that parse, call one service, and return a schema.

Errors are turned into HTTP responses in one place (:func:`_aifab_error`): every aifab error
has a stable code, and the body is ``{"error": code, "message": ..., "field": ...}``.
"""

from __future__ import annotations

import asyncio
import email.message
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from aifab import __version__
from aifab.api.schemas import LogChunk, NodeOut, ProjectIn, ProjectOut, UserIn, WorkloadDetail, WorkloadOut
from aifab.api.submissions import Submissions
from aifab.backends.base import Backend
from aifab.control.db import Database
from aifab.control.db.models import UserRow
from aifab.control.loops import Controller
from aifab.control.services import audit, auth, projects, workloads
from aifab.control.services import nodes as node_service
from aifab.control.settings import Settings
from aifab.core.errors import (
    AifabError,
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)

STATUS = {
    ValidationError: 422,
    NotFoundError: 404,
    ConflictError: 409,
    AuthenticationError: 401,
    PermissionDeniedError: 403,
}


@dataclass
class ServerContext:
    settings: Settings
    db: Database
    backend: Backend
    controller: Controller


def _status(exc: AifabError) -> int:
    for kind, code in STATUS.items():
        if isinstance(exc, kind):
            return code
    return 400


def _session(request: Request) -> Iterator[Session]:
    db = request.app.state.ctx.db
    with db.read_session() if request.method == "GET" else db.session() as s:
        yield s


# scope="function": commit before the response goes out, so "201" means it is stored.
Db = Annotated[Session, Depends(_session, scope="function")]


def _principal(s: Db, authorization: Annotated[str | None, Header()] = None) -> auth.Principal:
    return auth.authenticate(s, _token(authorization))


Who = Annotated[auth.Principal, Depends(_principal)]


def _token(authorization: str | None) -> str | None:
    return authorization.removeprefix("Bearer ").strip() if authorization else None


# The submission route reads its header and body itself (see ``submit``); its documentation is
# what FastAPI generates for `authorization: Header()` and `body: dict[str, Any]` parameters.
_SUBMIT_DOC: dict[str, Any] = {
    "parameters": [
        {
            "in": "header",
            "name": "authorization",
            "required": False,
            "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Authorization"},
        }
    ],
    "requestBody": {
        "content": {
            "application/json": {"schema": {"additionalProperties": True, "title": "Body", "type": "object"}}
        },
        "required": True,
    },
    "responses": {
        "422": {
            "description": "Validation Error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
        }
    },
}
_NO_BODY = object()


async def _json_body(request: Request) -> Any:
    """The request body as FastAPI parses it for a JSON body parameter: undecodable JSON is a 422
    at once (before authentication), a body that is not JSON stays bytes (see :func:`_object`)."""
    raw = await request.body()
    if not raw:
        return _NO_BODY
    content_type = request.headers.get("content-type")
    if not content_type:
        return raw
    if content_type != "application/json":
        message = email.message.Message()
        message["content-type"] = content_type
        subtype = message.get_content_subtype()
        if message.get_content_maintype() != "application" or not (
            subtype == "json" or subtype.endswith("+json")
        ):
            return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", e.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": e.msg},
                }
            ],
            body=e.doc,
        ) from e
    except Exception as e:
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e


def _object(body: Any) -> dict[str, Any]:
    """A parsed body that must be a JSON object: the 422 that validating it as a dict gives."""
    if isinstance(body, dict):
        return body
    if body is _NO_BODY:
        error = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
    else:
        error = {
            "type": "dict_type",
            "loc": ("body",),
            "msg": "Input should be a valid dictionary",
            "input": body,
        }
    raise RequestValidationError([error])


def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="aifab", version=__version__, description="aifab control plane API")
    app.state.ctx = ctx

    @app.exception_handler(AifabError)
    async def _aifab_error(request: Request, exc: AifabError) -> JSONResponse:
        return JSONResponse(
            status_code=_status(exc), content={"error": exc.code, "message": exc.message, "field": exc.field}
        )

    @app.exception_handler(OperationalError)
    async def _store_busy(request: Request, exc: OperationalError) -> JSONResponse:
        # The store is unavailable or its write lock stayed taken too long: a clear, retryable
        # answer, not an internal error.
        return JSONResponse(
            status_code=503,
            content={
                "error": "store_unavailable",
                "message": f"the store is busy or unreachable, retry: {exc.orig}",
                "field": None,
            },
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return JSONResponse(
            status_code=422,
            content={"error": "validation_error", "message": first.get("msg", ""), "field": field},
        )

    def source(request: Request) -> str:
        return request.client.host if request.client else ""

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/whoami")
    def whoami(p: Who) -> dict[str, Any]:
        return {"name": p.name, "admin": p.admin, "roles": {k: v.value for k, v in p.roles.items()}}

    submissions = Submissions(
        ctx.db, ctx.settings.checkpoints_dir, check=_object, on_stored=ctx.controller.wake.set
    )

    @app.post("/v1/workloads", status_code=201, response_model=WorkloadOut, openapi_extra=_SUBMIT_DOC)
    async def submit(request: Request) -> Response:
        # The busiest route. The body is parsed here; authentication, validation and the write
        # happen on the submissions' writer thread, in a transaction shared with the submissions
        # that arrive meanwhile (see aifab.api.submissions). Errors come in the order the other
        # routes give them: undecodable JSON, authentication, a body that is not an object, the
        # spec, the project, its limits.
        body = await _json_body(request)
        token = _token(request.headers.get("authorization"))
        answer = await asyncio.wrap_future(submissions.submit(token, body, source(request)))
        return Response(answer, status_code=201, media_type="application/json")

    @app.get("/v1/workloads", response_model=list[WorkloadOut])
    def list_workloads(
        s: Db,
        p: Who,
        project: str | None = None,
        phase: Annotated[list[str] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> Response:
        # Rows are already in the documented shape: skipping per-row model validation keeps a
        # listing of 10,000 queued workloads fast (`aifab ps`).
        return Response(workloads.listing_json(s, p, project, phase, limit), media_type="application/json")

    @app.get("/v1/workloads/{ref}")
    def describe(ref: str, s: Db, p: Who) -> WorkloadDetail:
        return WorkloadDetail(**workloads.describe(s, p, ref))

    @app.post("/v1/workloads/{ref}/cancel")
    def cancel(ref: str, s: Db, p: Who, request: Request) -> WorkloadOut:
        row = workloads.cancel(s, p, ref, source(request))
        ctx.controller.wake.set()
        return WorkloadOut(**workloads.summary(row))

    @app.get("/v1/workloads/{ref}/logs")
    def logs(
        ref: str,
        s: Db,
        p: Who,
        task: Annotated[int, Query(ge=0, le=100_000)] = 0,
        attempt: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
        offset: Annotated[int, Query(ge=0, le=1 << 62)] = 0,
    ) -> LogChunk:
        run = workloads.task_run(s, p, ref, task, attempt)
        row = workloads.get(s, p, ref)
        if not run.handle:
            return LogChunk(text="", offset=offset, attempt=run.attempt, done=run.state in ("exited", "lost"))
        data, nxt = ctx.backend.read_log(run.handle, offset)
        done = run.state in ("exited", "lost") and row.phase in (
            *workloads.FINAL_PHASES,
            "pending",
            "preempted",
        )
        return LogChunk(
            text=data.decode(errors="replace"), offset=nxt, attempt=run.attempt, done=done and not data
        )

    @app.get("/v1/projects")
    def list_projects(s: Db, p: Who) -> list[ProjectOut]:
        return [ProjectOut(**x) for x in projects.overview(s, p)]

    @app.post("/v1/projects", status_code=201)
    def create_project(body: ProjectIn, s: Db, p: Who, request: Request) -> ProjectOut:
        projects.create_queue(s, p, projects.QueueSpec(**body.model_dump()))
        audit.record(s, p, "queue.create", body.name, source(request), **body.model_dump())
        s.flush()
        return next(ProjectOut(**x) for x in projects.overview(s, p) if x["name"] == body.name)

    @app.get("/v1/nodes")
    def list_nodes(s: Db, p: Who) -> list[NodeOut]:
        return [NodeOut(**x) for x in node_service.listing(s)]

    @app.post("/v1/users", status_code=201)
    def create_user(body: UserIn, s: Db, p: Who, request: Request) -> dict[str, Any]:
        auth.require_admin(p)
        auth.create_user(s, body.name, body.admin)
        for project, role in body.roles.items():
            if not projects.is_project(s, project):
                raise ValidationError(f"no project {project}", field=f"roles.{project}")
            auth.set_role(s, body.name, project, auth.Role(role))
        token = auth.issue_token(s, body.name)
        audit.record(s, p, "user.create", body.name, source(request), admin=body.admin, roles=body.roles)
        return {"name": body.name, "token": token}

    @app.post("/v1/users/{name}/tokens", status_code=201)
    def new_token(name: str, s: Db, p: Who, request: Request) -> dict[str, Any]:
        auth.require_admin(p)
        token = auth.issue_token(s, name)
        audit.record(s, p, "token.issue", name, source(request))
        return {"name": name, "token": token}

    @app.post("/v1/users/{name}/tokens/revoke")
    def revoke_tokens(name: str, s: Db, p: Who, request: Request) -> dict[str, Any]:
        auth.require_admin(p)
        if s.get(UserRow, name) is None:
            raise NotFoundError(f"no user {name}", field="name")
        revoked = auth.revoke_tokens(s, name)
        audit.record(s, p, "token.revoke", name, source(request), revoked=revoked)
        return {"name": name, "revoked": revoked}

    @app.get("/v1/audit")
    def read_audit(
        s: Db, p: Who, limit: Annotated[int, Query(ge=1, le=10_000)] = 200
    ) -> list[dict[str, Any]]:
        return [
            {
                "time": r.time,
                "actor": r.actor,
                "action": r.action,
                "target": r.target,
                "source": r.source,
                "detail": r.detail,
            }
            for r in audit.read(s, p, limit)
        ]

    return app
