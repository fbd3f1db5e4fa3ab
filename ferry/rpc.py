"""gRPC glue shared by the three services: error mapping both ways, and
server start-up with health checking."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ferry import errors
from ferry.errors import shown

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


# Longest string a request field may hold (paths, names, ids): PATH_MAX.
MAX_FIELD_CHARS = 4096
# Cap on an error's details: gRPC sends them in metadata (8 KiB by default).
MAX_DETAILS_CHARS = 4000


def check_strings(message: Message, path: str = "") -> None:
    """Refuses NUL bytes and absurdly long values in every string field of a
    request (nested and repeated too): they are never valid paths or names,
    and would otherwise surface as internal errors deep in the service."""
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        values = value if field.is_repeated else [value]
        for item in values:
            if field.type == field.TYPE_MESSAGE:
                check_strings(item, f"{name}.")
            elif field.type == field.TYPE_STRING:
                if "\0" in item:
                    raise errors.InvalidInput(
                        f"{name} {shown(item)!r} contains a NUL byte; remove it"
                    )
                if len(item) > MAX_FIELD_CHARS:
                    raise errors.InvalidInput(
                        f"{name} is {len(item)} characters long (at most {MAX_FIELD_CHARS}): "
                        f"{shown(item)!r}; pass a shorter value"
                    )


def status_code_for(err: errors.FerryError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.ABORTED


def error_from_rpc(err: grpc.RpcError, service: str, hint: str = "") -> errors.FerryError:
    """Turns a failed call back into a FerryError so callers (the CLI, the
    control plane) handle remote and local failures alike."""
    # grpc.aio.AioRpcError carries code() and details() but is no grpc.Call.
    is_call = isinstance(err, grpc.Call | grpc.aio.AioRpcError)
    code = err.code() if is_call else grpc.StatusCode.UNKNOWN
    details = (err.details() if is_call else None) or str(err)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # The server's own UNAVAILABLE carries an operator message: keep it.
        # Otherwise the channel could not reach the server at all.
        if is_call and _from_server(err):
            return errors.Unavailable(details)
        fix = f"; {hint}" if hint else ""
        return errors.Unavailable(f"{service} is not reachable: {shown(details)}{fix}")
    for cls, c in _CODES:
        if c == code:
            return cls(details)
    return errors.OperationFailed(f"{service} failed: {details}")


# Trailing metadata on errors a Ferry servicer raised on purpose, so a client
# tells "the server said UNAVAILABLE" from "no server answered".
FROM_SERVER_KEY = "ferry-error"


def _from_server(err: grpc.RpcError) -> bool:
    trailing = getattr(err, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    return any(key == FROM_SERVER_KEY for key, _ in metadata or ())


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


def check_address(value: str, flag: str) -> None:
    """A server address a client may dial: host:port (port 1..65535) or
    unix:PATH. Refused up front so a typo is an input error, not a long wait
    and raw gRPC text."""
    if value.startswith("unix:") and len(value) > len("unix:") and "\0" not in value:
        return
    host, sep, port = value.rpartition(":")
    if sep and _HOST.match(host) and port.isdigit() and 0 < int(port) <= 65535:
        return
    raise errors.InvalidInput(
        f"{flag} {shown(value)!r} is not an address; write host:port (e.g. 127.0.0.1:7400) "
        "or unix:/path/to.sock"
    )


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
                    await context.abort(
                        status_code_for(e), shown(str(e), MAX_DETAILS_CHARS),
                        trailing_metadata=((FROM_SERVER_KEY, "1"),),
                    )
                except Exception as e:
                    if isinstance(e, grpc.aio.AbortError):
                        raise
                    log.exception("unexpected error in %s", method)
                    await context.abort(
                        grpc.StatusCode.INTERNAL, shown(f"internal error: {e}", MAX_DETAILS_CHARS)
                    )

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
                    await context.abort(
                        status_code_for(e), shown(str(e), MAX_DETAILS_CHARS),
                        trailing_metadata=((FROM_SERVER_KEY, "1"),),
                    )
                except Exception as e:
                    if isinstance(e, grpc.aio.AbortError):
                        raise
                    log.exception("unexpected error in %s", method)
                    await context.abort(
                        grpc.StatusCode.INTERNAL, shown(f"internal error: {e}", MAX_DETAILS_CHARS)
                    )

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def parse_listen(listen: str) -> tuple[str, int | None]:
    """Checks a --listen value: host:port with port 0..65535 (0 picks one),
    [v6]:port, or unix:PATH in an existing directory. grpc itself accepts
    garbage silently (port 99999 binds a random port, "localhost" binds 443,
    "unix:" an abstract socket). Returns (host or socket path, port or None)."""
    fix = "write host:port (port 0..65535, 0 picks a free one) or unix:/path/to.sock"
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path or path.endswith("/"):
            raise errors.InvalidInput(f"--listen {shown(listen)!r} names no socket file; {fix}")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise errors.InvalidInput(
                f"--listen {shown(listen)!r}: the directory {directory} does not exist; "
                "create it or pick another socket path"
            )
        return path, None
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535 or "\0" in listen:
        raise errors.InvalidInput(f"--listen {shown(listen)!r} is not an address; {fix}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _bind_error(listen: str, host: str, port: int | None) -> str:
    """Why grpc could not bind, found by binding the same address ourselves."""
    if port is None:
        family, address = socket.AF_UNIX, host
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address = (host, port)  # type: ignore[assignment]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"cannot listen on {listen}: address already in use; pass a free --listen"
        return f"cannot listen on {listen}: {e.strerror or e}; pass another --listen"
    return f"cannot listen on {listen}; pass another --listen"


async def start_server(
    listen: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: list[str],
) -> tuple[grpc.aio.Server, int]:
    """Starts a grpc.aio server on `listen` (host:port, port 0 picks one, or
    unix:PATH) with the error mapping and grpc.health.v1 SERVING for each
    service name. Returns the server and the bound port."""
    host, want = parse_listen(listen)
    # Without SO_REUSEPORT a port another server holds is refused, not shared.
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor()], options=[("grpc.so_reuseport", 0)]
    )
    register(server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = -1
    if port < 0 or (want is not None and port == 0):
        raise errors.InvalidInput(_bind_error(listen, host, want))
    await server.start()
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound = listen if want is None else f"{listen.rpartition(':')[0]}:{port}"
    log.info("%s listening on %s", ", ".join(service_names), bound)
    return server, port
