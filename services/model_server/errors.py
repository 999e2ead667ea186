"""Named errors of the model server; `app.py` maps each to one HTTP status in the OpenAI error shape."""

from __future__ import annotations


class ServerError(Exception):
    """Base of the errors a client sees: `status`, OpenAI `type`, optional `param` and `code`."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(ServerError):
    """Malformed or out-of-limits request (400)."""

    status = 400
    type = "invalid_request_error"


class Unauthorized(ServerError):
    """Missing or unknown API key (401), with the `WWW-Authenticate` challenge RFC 9110 asks for."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, param=param, code=code,
                         headers={"WWW-Authenticate": 'Bearer realm="hiermem"', **(headers or {})})


class Forbidden(ServerError):
    """The key may not use the memory it asked for, or read what it asked for (403)."""

    status = 403
    type = "permission_error"
    code = "memory_not_allowed"


class NotFound(ServerError):
    """Unknown route or model (404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(ServerError):
    """Request body over `max_body_bytes` (413)."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(ServerError):
    """Queue full: try again after `Retry-After` seconds (429)."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class MemoryUnavailable(ServerError):
    """Some memory level could not be fetched and the server runs `strict` (503)."""

    status = 503
    type = "server_error"
    code = "memory_unavailable"
