"""The error boundary: every error a client sees, ours (errors.py), FastAPI's validation errors (400, not
422), Starlette's 404/405 and anything unexpected (500, detail logged), in the OpenAI error shape
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServerError
from .schemas import ErrorResponse

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 503)}
"""The error statuses every route documents (OpenAPI), all in the shape of `ErrorResponse`."""

ErrorBody = dict[str, dict[str, str | None]]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> ErrorBody:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: ServerError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


_TYPE_ERRORS = {"literal_error", "string_type", "list_type", "int_type", "bool_type", "float_type", "dict_type",
                "model_type", "none_required"}
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "literal"}
_FIELD_RE = re.compile(r"[a-z_][a-z0-9_]*")


def _param(loc: Sequence[int | str]) -> str | None:
    """The request field an error is about, as a dotted path (`messages.0.content`): the location up to the
    first union-member tag pydantic adds (`str`, `list[int]`, `function-after[...]`, a model's name)."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif isinstance(part, str) and _FIELD_RE.fullmatch(part) and part not in _TYPE_TAGS:
            parts.append(part)
        else:
            break
    return ".".join(parts) or None


async def on_server_error(request: Request, exc: ServerError) -> JSONResponse:
    return error_response(exc)


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    # of a union's failed members, the one that got furthest into the value says most, and a specific
    # error (a value error, a limit) more than "should be a string"
    first = max(errors, key=lambda e: (len(e.get("loc", ())), e.get("type") not in _TYPE_ERRORS)) \
        if errors else {}
    loc = list(first.get("loc", ()))
    param = _param(loc[1:] if loc[:1] == ["body"] else loc)
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "extra_forbidden":
        msg = "unknown field (not part of this API)"
    return JSONResponse(error_body(f"{param or 'body'}: {msg}", "invalid_request_error", param,
                                   "invalid_request"), status_code=400)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(exc.detail), type_, None, str(exc.status_code)),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(error_body("internal error", "server_error", None, "internal_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a request can raise to its status and the OpenAI error shape."""
    app.exception_handler(ServerError)(on_server_error)
    app.exception_handler(RequestValidationError)(on_validation_error)
    app.exception_handler(StarletteHTTPException)(on_http_error)
    app.exception_handler(Exception)(on_unexpected)
