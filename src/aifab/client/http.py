"""A typed Python client for the aifab API (the CLI uses nothing else)."""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    """An error answer from the server: HTTP status, stable code, message, offending field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.code, self.message, self.field = status, code, message, field


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.ConnectError:
            raise ApiError(
                0, "unreachable", f"cannot reach the aifab server at {self.url}: is `aifab server` running?"
            ) from None
        if r.status_code >= 400:
            try:
                body = r.json()
                raise ApiError(
                    r.status_code, body.get("error", "error"), body.get("message", r.text), body.get("field")
                )
            except ValueError:
                raise ApiError(r.status_code, "error", r.text) from None
        return r.json()

    # ----- workloads -------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/workloads", json=spec))

    def workloads(
        self, project: str | None = None, phases: list[str] | None = None, limit: int = 100_000
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if project:
            params["project"] = project
        if phases:
            params["phase"] = phases
        return list(self._call("GET", "/v1/workloads", params=params))

    def describe(self, ref: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/workloads/{ref}"))

    def cancel(self, ref: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/workloads/{ref}/cancel"))

    def logs(self, ref: str, task: int = 0, offset: int = 0, attempt: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"task": task, "offset": offset}
        if attempt is not None:
            params["attempt"] = attempt
        return dict(self._call("GET", f"/v1/workloads/{ref}/logs", params=params))

    # ----- projects, nodes, users ------------------------------------------------------------
    def projects(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/projects"))

    def create_project(self, **fields: Any) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/projects", json=fields))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/nodes"))

    def create_user(
        self, name: str, admin: bool = False, roles: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return dict(
            self._call("POST", "/v1/users", json={"name": name, "admin": admin, "roles": roles or {}})
        )

    def revoke_tokens(self, user: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/users/{user}/tokens/revoke"))

    def whoami(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/whoami"))

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/health"))

    def audit(self, limit: int = 200) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/audit", params={"limit": limit}))
