"""ferry.rpc against real gRPC servers and sockets: --listen values grpc
would silently misread are refused, and an unreachable server is reported
as such, naming the address."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest

from ferry import errors
from ferry.rpc import check_address, error_from_rpc, parse_listen, start_server
from ferry.v1 import controlplane_pb2, controlplane_pb2_grpc


@pytest.mark.parametrize("listen", [
    "127.0.0.1:99999", "127.0.0.1:-1", "localhost", "unix:", "127.0.0.1:", ":80", "a\0b:1",
])
def test_listen_values_grpc_misreads_are_refused(listen: str):
    with pytest.raises(errors.InvalidInput) as e:
        parse_listen(listen)
    why = "names no socket file" if listen == "unix:" else "is not an address"
    assert str(e.value) == (
        f"--listen {listen!r} {why}; write host:port (port 0..65535, 0 picks a free one) "
        "or unix:/path/to.sock"
    )


def test_a_unix_socket_in_a_missing_directory_is_refused(tmp_path: Path):
    with pytest.raises(errors.InvalidInput) as e:
        parse_listen(f"unix:{tmp_path}/nope/x.sock")
    assert str(e.value) == (
        f"--listen 'unix:{tmp_path}/nope/x.sock': the directory {tmp_path}/nope does not "
        "exist; create it or pick another socket path"
    )


def _serve(listen: str) -> int:
    async def go() -> int:
        server, port = await start_server(listen, lambda s: None, [])
        await server.stop(None)
        return port
    return asyncio.run(go())


def test_port_zero_binds_a_free_port_and_reports_it():
    assert 0 < _serve("127.0.0.1:0") <= 65535


def test_a_port_in_use_is_refused_with_the_fix():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(errors.InvalidInput) as e:
            _serve(f"127.0.0.1:{port}")
    assert str(e.value) == (
        f"cannot listen on 127.0.0.1:{port}: address already in use; pass a free --listen"
    )


@pytest.mark.parametrize(
    "address", ["garbage", "http://x:80", "127.0.0.1:0", "host:99999", "unix:"]
)
def test_garbage_client_addresses_are_invalid_input(address: str):
    with pytest.raises(errors.InvalidInput) as e:
        check_address(address, "--controlplane")
    assert str(e.value).startswith(f"--controlplane {address!r} is not an address; write host:port")
    assert e.value.exit_code == 2


def _list_plans(address: str) -> grpc.RpcError:
    async def go() -> grpc.RpcError:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
            try:
                await stub.ListPlans(controlplane_pb2.ListPlansRequest(), timeout=30)
            except grpc.aio.AioRpcError as e:
                return e
        raise AssertionError("the call succeeded")
    return asyncio.run(go())


def test_nothing_listening_is_reported_as_not_reachable_with_the_flag(tmp_path: Path):
    err = error_from_rpc(_list_plans(f"unix:{tmp_path}/none.sock"),
                         f"the control plane at unix:{tmp_path}/none.sock", "check --controlplane")
    assert isinstance(err, errors.Unavailable)
    assert str(err).startswith(f"the control plane at unix:{tmp_path}/none.sock is not reachable: ")
    assert str(err).endswith("; check --controlplane")


def test_an_http_server_is_reported_as_not_reachable():
    with socket.socket() as http:
        http.bind(("127.0.0.1", 0))
        http.listen()
        port = http.getsockname()[1]

        async def answer() -> None:
            loop = asyncio.get_running_loop()
            conn, _ = await loop.sock_accept(http)
            with conn:
                await loop.sock_recv(conn, 100)
                await loop.sock_sendall(conn, b"HTTP/1.1 400 Bad Request\r\n\r\n")

        async def both() -> grpc.RpcError:
            http.setblocking(False)
            task = asyncio.create_task(answer())
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
                try:
                    await stub.ListPlans(controlplane_pb2.ListPlansRequest(), timeout=30)
                except grpc.aio.AioRpcError as e:
                    task.cancel()
                    return e
            raise AssertionError("the call succeeded")

        err = error_from_rpc(asyncio.run(both()), f"the control plane at 127.0.0.1:{port}",
                             "check --controlplane")
    assert isinstance(err, errors.Unavailable)
    assert str(err).startswith(f"the control plane at 127.0.0.1:{port} is not reachable: ")
    assert str(err).endswith("; check --controlplane")


def test_a_servers_own_unavailable_keeps_its_message():
    class Refusing(controlplane_pb2_grpc.ControlPlaneServicer):  # type: ignore[misc]
        async def ListPlans(self, request: object, context: object) -> object:
            raise errors.Unavailable("qemu-nbd did not answer; try again")

    async def go() -> grpc.RpcError:
        server, port = await start_server(
            "127.0.0.1:0",
            lambda s: controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(Refusing(), s),
            [],
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
                try:
                    await stub.ListPlans(controlplane_pb2.ListPlansRequest(), timeout=30)
                except grpc.aio.AioRpcError as e:
                    return e
        finally:
            await server.stop(None)
        raise AssertionError("the call succeeded")

    err = error_from_rpc(asyncio.run(go()), "the control plane", "check --controlplane")
    assert isinstance(err, errors.Unavailable)
    assert str(err) == "qemu-nbd did not answer; try again"
