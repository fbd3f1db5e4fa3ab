"""`serve` as the CLI runs it: a process on a Unix socket, stopped by SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_health_on_a_unix_socket_and_stops_on_sigterm(tmp_path: Path):
    sock = tmp_path / "transferd.sock"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from transferd.server import serve; "
         "serve(sys.argv[1], sys.argv[2])", f"unix:{sock}", f"127.0.0.1:{port}"],
    )
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="ferry.v1.TransferService"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + 10
        while True:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=5).read().decode()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert 'ferry_transfers{state="running"} 0.0' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
