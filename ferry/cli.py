"""The `ferry` command. Each subcommand's work lives in its component; this
module only parses flags (each with a FERRY_* environment variable) and turns
FerryError into a message and an exit status instead of a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from ferry import errors
from ferry.logs import setup_logging
from ferry.process import die_with_parent

DEFAULT_CONTROLPLANE = "127.0.0.1:7400"
DEFAULT_TRANSFERD = "127.0.0.1:7401"
DEFAULT_CONVERTER = "127.0.0.1:7402"
DEFAULT_TRANSFERD_METRICS = "127.0.0.1:9401"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Set by `ferry migrate` for the services it starts: the pid they must not outlive.
DIE_WITH_PARENT_ENV = "FERRY_DIE_WITH_PARENT"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "ferry")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Move virtual machines onto KubeVirt."
    )
    parser.add_argument(
        "--log-level", default=_env("FERRY_LOG_LEVEL", "info"), choices=LOG_LEVELS,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one of the services")
    serve_sub = serve.add_subparsers(dest="service", required=True)

    s = serve_sub.add_parser("transferd", help="the transfer daemon")
    s.add_argument("--listen", default=_env("FERRY_TRANSFERD_LISTEN", DEFAULT_TRANSFERD))
    s.add_argument(
        "--metrics-listen", default=_env("FERRY_TRANSFERD_METRICS", DEFAULT_TRANSFERD_METRICS),
        help="host:port for Prometheus /metrics; empty to disable",
    )

    s = serve_sub.add_parser("converter", help="the guest converter")
    s.add_argument("--listen", default=_env("FERRY_CONVERTER_LISTEN", DEFAULT_CONVERTER))

    s = serve_sub.add_parser("controlplane", help="the control plane")
    s.add_argument(
        "--listen", default=_env("FERRY_CONTROLPLANE_LISTEN", DEFAULT_CONTROLPLANE)
    )
    s.add_argument("--state-dir", default=_env("FERRY_STATE_DIR", _default_state_dir()))
    s.add_argument("--transferd", default=_env("FERRY_TRANSFERD", DEFAULT_TRANSFERD))
    s.add_argument("--converter", default=_env("FERRY_CONVERTER", DEFAULT_CONVERTER))

    m = sub.add_parser(
        "migrate",
        help="migrate disk images to a local target",
        description=(
            "Migrate one VM made of local disk images. Starts the three services "
            "as child processes on Unix sockets unless --controlplane names a "
            "running control plane."
        ),
    )
    m.add_argument(
        "--source", required=True,
        help="disk:PATH[,PATH...] disk images (raw, qcow2, vmdk) of one VM, boot disk first",
    )
    m.add_argument("--target", required=True, help="local:DIR directory for the result")
    m.add_argument(
        "--name", help="VM name (default: from a .vmx beside the disk, or the file name)"
    )
    m.add_argument(
        "--mac", action="append", default=[],
        help="source NIC MAC address, in order (repeat); default: from a .vmx beside the disk",
    )
    m.add_argument(
        "--skip-conversion", action="store_true",
        help="copy the disks and create the VM without converting the guest "
        "(data disks, or a guest already on virtio)",
    )
    m.add_argument("--controlplane", default=_env("FERRY_CONTROLPLANE", ""),
                   help="host:port of a running control plane")
    m.add_argument("--state-dir", default=_env("FERRY_STATE_DIR", ""),
                   help="state directory of the control plane it starts (default: a temporary one)")
    c = sub.add_parser(
        "copy", help="copy one disk (NBD URI or local image) to a file or block device",
        description="Copy one disk with transferd's engine, in-process. Holes and zero "
        "extents of the source are never read. Interrupted (SIGINT, SIGTERM), it removes a "
        "target file it created (a second signal does not cut that short; one after the "
        "copy completed changes nothing); killed outright, it leaves the target and a journal "
        "(TARGET.ferry-journal beside a file), and the same command resumes the copy. "
        "Exit status: 0 only when the target is complete and flushed (and, with --verify, "
        "equal to the source); 2 when an argument, the source or the target is wrong; "
        "130 or 143 when interrupted by SIGINT or SIGTERM; 1 when the source could not "
        "be reached or the copy failed. Numeric options take 0 for their default.",
    )
    from transferd.copy import add_arguments as add_copy_arguments

    add_copy_arguments(c)
    return parser


def _die_with_parent() -> None:
    """A service started by `ferry migrate` stops when ferry migrate dies."""
    parent = os.environ.pop(DIE_WITH_PARENT_ENV, "")
    if parent.isdigit():
        die_with_parent(int(parent))


def _ignore_stop_signals() -> None:
    """A command's outcome is decided once it returned, and Python gives
    SIGINT and SIGTERM back their defaults on its way out: a signal from then
    to the exit would only hide that outcome, with a traceback or by killing."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in LOG_LEVELS:
        parser.error(
            f"FERRY_LOG_LEVEL={args.log_level!r} is not a log level; "
            f"use one of {', '.join(LOG_LEVELS)}"
        )
    setup_logging(args.log_level)
    try:
        if args.command == "serve":
            _die_with_parent()
            if args.service == "transferd":
                from transferd.server import serve as serve_transferd

                serve_transferd(args.listen, args.metrics_listen)
            elif args.service == "converter":
                from converter.server import serve as serve_converter

                serve_converter(args.listen)
            else:
                from controlplane.server import serve as serve_controlplane

                serve_controlplane(args.listen, args.state_dir, args.transferd, args.converter)
            return 0
        if args.command == "copy":
            from transferd.copy import run_copy

            return run_copy(args)
        from controlplane.migrate import run_migrate

        return run_migrate(args)
    except errors.FerryError as e:
        print(f"ferry: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130
    finally:
        _ignore_stop_signals()


if __name__ == "__main__":
    sys.exit(main())
