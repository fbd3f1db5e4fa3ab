"""Prometheus metrics of one transferd, in their own registry so several
daemons (tests run one per module) never collide."""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ferry import errors

BYTE_KINDS = ("read", "written", "zeroed", "skipped")
STATES = ("pending", "running", "succeeded", "failed", "cancelled")


class TransferMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.bytes = Counter(
            "ferry_transfer_bytes",
            "Bytes handled by transfers: read from sources, written to targets, "
            "zeroed on targets, or skipped because the target already reads as zero.",
            ["kind"],
            registry=self.registry,
        )
        for kind in BYTE_KINDS:
            self.bytes.labels(kind)
        self.inflight = Gauge(
            "ferry_transfer_inflight_requests",
            "Source reads sent and not yet answered, over all transfers.",
            registry=self.registry,
        )
        self.inflight_bytes = Gauge(
            "ferry_transfer_inflight_bytes",
            "Bytes read from sources and not yet written, over all transfers.",
            registry=self.registry,
        )
        self.retries = Counter(
            "ferry_transfer_retries",
            "Source commands retried after a failure (a lost connection or an error reply).",
            registry=self.registry,
        )
        self.transfers = Gauge(
            "ferry_transfers", "Transfers known to this daemon, per state.", ["state"],
            registry=self.registry,
        )
        for state in STATES:
            self.transfers.labels(state)
        self.duration = Histogram(
            "ferry_transfer_duration_seconds",
            "Wall time of finished transfers, per final state.",
            ["state"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
            registry=self.registry,
        )

    def count_bytes(self, kind: str, n: int) -> None:
        self.bytes.labels(kind).inc(n)

    def track_inflight(self, requests: Callable[[], float], nbytes: Callable[[], float]) -> None:
        self.inflight.set_function(requests)
        self.inflight_bytes.set_function(nbytes)

    def serve(self, listen: str) -> tuple[WSGIServer, int]:
        """Serves /metrics on host:port (port 0 picks one); returns the
        server and its port."""
        host, sep, port = listen.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
            raise errors.InvalidInput(
                f"metrics address {listen[:200]!r} is not host:port (a port is 0..65535); "
                "pass e.g. 127.0.0.1:9401, or an empty value to disable metrics"
            )
        try:
            server, _ = start_http_server(int(port), host.strip("[]") or "0.0.0.0",
                                          registry=self.registry)
        except (OSError, ValueError) as e:  # ValueError: a host that is no name
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise errors.InvalidInput(
                f"cannot serve metrics on {listen[:200]!r}: {reason}; pass a free host:port"
            ) from e
        return server, int(server.server_port)
