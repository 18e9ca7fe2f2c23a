"""Every way a request can fail, answered in one place with OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) and the status a client retries or gives up on."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from swarmlm.engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError
from swarmlm.serve.auth import AuthError
from swarmlm.serve.protocol import ErrorResponse

# documented in the OpenAPI spec of the generating endpoints, so clients see the error shape
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 429, 503)
}

_AUTH_KINDS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class APIError(Exception):
    """A refusal the serving code decides on itself (bad prompt, unknown model, client gone)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


class ClientGone(Exception):
    """The client disconnected before its non-streaming answer was ready."""


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


async def _api_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, APIError)
    return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)


async def _auth_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, AuthError)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(math.ceil(e.retry_after))
    return error_response(e.status, e.message, _AUTH_KINDS[e.status], code=e.code, headers=headers)


async def _validation_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(
            400,
            f"malformed JSON body: {first.get('ctx', {}).get('error', '')}".strip(),
            "invalid_request_error",
            code="json_invalid",
        )
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(
        422, f"{where}: {first.get('msg', 'invalid value')}", "invalid_request_error", where or None, first.get("type")
    )


async def _http_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(e.status_code, str(e.detail), kind)


async def _queue_full(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, QueueFullError)
    return error_response(
        429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": str(e.retry_after)}
    )


async def _engine_dead(_: Request, e: Exception) -> JSONResponse:
    return error_response(503, str(e), "server_error", code="engine_unavailable")


async def _request_failed(_: Request, e: Exception) -> JSONResponse:
    return error_response(503, str(e), "server_error", code="request_failed")


async def _client_gone(_: Request, __: Exception) -> JSONResponse:
    # nobody reads this answer; 499 is nginx's "client closed request", seen in access logs
    return error_response(499, "client closed the request", "invalid_request_error", code="client_closed")


def install_error_handlers(app: FastAPI) -> None:
    handlers = {
        APIError: _api_error,
        AuthError: _auth_error,
        RequestValidationError: _validation_error,
        StarletteHTTPException: _http_error,
        QueueFullError: _queue_full,
        EngineDeadError: _engine_dead,
        RequestFailedError: _request_failed,
        ClientGone: _client_gone,
    }
    for exc, handler in handlers.items():
        app.add_exception_handler(exc, handler)
