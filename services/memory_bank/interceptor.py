"""The gRPC error boundary of the bank service: domain errors -> precise status codes, plus metrics.

Handlers raise `memory_store.errors.*` or `services.memory_bank.errors.*`; this interceptor is the only
place that turns them into status codes. Anything else is INTERNAL, with its traceback logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memory_store import errors as store_errors

from . import errors, metrics

log = logging.getLogger(__name__)

# Most specific first: the first matching class decides.
ERROR_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotInShard, grpc.StatusCode.NOT_FOUND),
    (errors.DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (store_errors.NodeNotFound, grpc.StatusCode.NOT_FOUND),
    (store_errors.BlockCorrupt, grpc.StatusCode.DATA_LOSS),
    (store_errors.BankMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (store_errors.InvalidSpec, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a known domain error, or None for the unexpected."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return None


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes and records requests, errors and latency per method.

    Applies to our own service only (health and reflection pass through untouched)."""

    def __init__(self, service_prefix: str) -> None:
        self._prefix = service_prefix

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method_path = handler_call_details.method
        if handler is None or not method_path.startswith(self._prefix):
            return handler
        method = method_path.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method), handler.request_deserializer,
                handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method), handler.request_deserializer,
                handler.response_serializer)
        return handler  # no client-streaming methods in this service


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code = status_for(exc)
    if code is None:
        log.exception("%s failed unexpectedly", method, exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
    else:
        log.info("%s -> %s: %s", method, code.name, exc)
        message = str(exc) or type(exc).__name__
    metrics.ERRORS.labels(method, code.name).inc()
    metrics.REQUESTS.labels(method, code.name).inc()
    await context.abort(code, message)


def _finish(method: str, t0: float) -> None:
    metrics.LATENCY.labels(method).observe(time.perf_counter() - t0)
    metrics.INFLIGHT.dec()


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        t0 = time.perf_counter()
        metrics.INFLIGHT.inc()
        try:
            response = await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the error boundary
            await _abort(context, method, exc)
        else:
            metrics.REQUESTS.labels(method, "OK").inc()
            return response
        finally:
            _finish(method, t0)

    return wrapped


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        metrics.INFLIGHT.inc()
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the error boundary
            await _abort(context, method, exc)
        else:
            metrics.REQUESTS.labels(method, "OK").inc()
        finally:
            _finish(method, t0)

    return wrapped
