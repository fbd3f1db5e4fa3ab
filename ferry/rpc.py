"""gRPC glue shared by the three services: error mapping both ways, and
server start-up with health checking."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ferry import errors

log = logging.getLogger(__name__)

_CODES: list[tuple[type[errors.FerryError], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.OperationFailed, grpc.StatusCode.ABORTED),
]


def status_code_for(err: errors.FerryError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.ABORTED


def error_from_rpc(err: grpc.RpcError, service: str) -> errors.FerryError:
    """Turns a failed call back into a FerryError so callers (the CLI, the
    control plane) handle remote and local failures alike."""
    # grpc.aio.AioRpcError carries code() and details() but is no grpc.Call.
    is_call = isinstance(err, grpc.Call | grpc.aio.AioRpcError)
    code = err.code() if is_call else grpc.StatusCode.UNKNOWN
    details = (err.details() if is_call else None) or str(err)
    for cls, c in _CODES:
        if c == code:
            return cls(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.Unavailable(f"{service} is not reachable: {details}")
    return errors.OperationFailed(f"{service} failed: {details}")


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns FerryError raised by a servicer into the matching status code, and
    anything unexpected into INTERNAL with the exception logged, never a bare
    UNKNOWN."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        # Typed loosely: grpc-stubs describe the synchronous handler types only.
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                try:
                    return await inner_uu(request, context)
                except errors.FerryError as e:
                    await context.abort(status_code_for(e), str(e))
                except Exception as e:
                    if isinstance(e, grpc.aio.AbortError):
                        raise
                    log.exception("unexpected error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_us: Any = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except errors.FerryError as e:
                    await context.abort(status_code_for(e), str(e))
                except Exception as e:
                    if isinstance(e, grpc.aio.AbortError):
                        raise
                    log.exception("unexpected error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def start_server(
    listen: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: list[str],
) -> tuple[grpc.aio.Server, int]:
    """Starts a grpc.aio server on `listen` (host:port, port 0 picks one) with
    the error mapping and grpc.health.v1 SERVING for each service name.
    Returns the server and the bound port."""
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    register(server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise errors.InvalidInput(
            f"cannot listen on {listen!r}: {e}; pass a free host:port with --listen"
        ) from e
    await server.start()
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port
