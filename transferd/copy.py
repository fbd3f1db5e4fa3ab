"""`ferry copy SOURCE TARGET`: one transfer in-process with transferd's engine,
for scripts and benchmarks, in the spirit of nbdcopy.

SOURCE is an NBD URI, or a local disk image (raw, qcow2, vmdk, ...) that is
served read-only by qemu-nbd for the copy. The exit status is 0 only when the
target is complete and flushed (and, with --verify, checked).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import quote

import uvloop

from ferry import errors
from ferry.errors import shown
from ferry.process import die_with_parent
from transferd import engine, extents
from transferd.job import Job, Spec, check_target_for, first_error, tuning_from
from transferd.sources.nbd import SCHEMES

FLAGS = {"request_size": "--request-size", "max_requests": "--requests",
         "connections": "--connections", "profile": "--profile",
         "max_bytes_in_flight": "--request-size"}
SERVER_START_SECONDS = 30.0
# A list of areas in text: about 20 bytes each, so a million and more areas
# (each takes memory: a few hundred MB at this size).
MAX_AREAS_FILE = 32 << 20
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class CopyOptions:
    """The tunables `ferry copy` takes (0 or "": the profile's default)."""

    request_size: int = 0
    max_requests: int = 0
    max_bytes_in_flight: int = 0
    connections: int = 0
    profile: str = ""


def parse_size(text: str) -> int:
    """A byte count, optionally with a K, M or G suffix (powers of 1024)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in UNITS else ""
    number = value[: len(value) - len(unit)]
    if not (number.isascii() and number.isdigit()) or len(number) > 20:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a size; pass e.g. 2097152 or 2M")
    size = int(number) * UNITS[unit]
    if size >= 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is far too large; pass e.g. 2M")
    return size


def parse_count(text: str) -> int:
    """A count of things (requests, connections): 0 for the default or more;
    the option's own range is checked with the other options."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a whole number of 0 or more; pass e.g. 16, or 0 for the default"
        )
    # Its length first: int() of a few thousand digits is refused, and slow.
    if len(digits) > 10 or int(digits) >= 1 << 32:
        raise argparse.ArgumentTypeError(f"{text!r} is far too large; pass e.g. 16")
    return int(digits)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="NBD URI (nbd://, nbd+unix://, nbds://, nbds+unix://) "
                   "or a local disk image (raw, qcow2, vmdk, ...)")
    p.add_argument("target", help="file (created, or overwritten in place) or block device")
    p.add_argument("--verify", action="store_true",
                   help="compare block hashes of source and target after the copy")
    p.add_argument("--request-size", type=parse_size, default=0,
                   help="largest read, a power of two from 4K to 32M (default 2M; at most "
                   "2M with --profile vddk)")
    p.add_argument("--requests", type=parse_count, default=0,
                   help="requests in flight per connection, up to 256 (default 16)")
    p.add_argument("--connections", type=parse_count, default=0,
                   help="NBD connections, up to 16 (default 1); a server that does not "
                   "advertise multi-conn gets one")
    p.add_argument("--profile", default="",
                   help="source profile: default, or vddk for nbdkit's VDDK plugin (one "
                   "connection, requests of at most 2M)")
    p.add_argument("--direct", action="store_true",
                   help="write the target with O_DIRECT, past the page cache (the "
                   "filesystem must support it)")
    p.add_argument("--changed-areas", metavar="FILE",
                   help="copy only these areas onto an earlier copy: JSON "
                   '[{"start": N, "length": N}, ...] or "OFFSET LENGTH" lines')
    p.add_argument("--dirty-bitmap", metavar="NAME", default="",
                   help="copy only the areas marked in this dirty bitmap of the source")
    p.add_argument("--progress", action="store_true",
                   help="show progress on stderr (a bar on a terminal, lines otherwise)")


def uri_scheme(source: str) -> str:
    """What comes before "://", in lower case ("" for a path)."""
    scheme, sep, _ = source.partition("://")
    return scheme.lower() if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else ""


def read_areas(path: str) -> tuple[tuple[int, int], ...]:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise errors.InvalidInput(
                f"changed areas file {path} is not a regular file; write the list to a file "
                "and pass that"
            )
        if st.st_size > MAX_AREAS_FILE:
            raise errors.InvalidInput(
                f"changed areas file {path} holds {st.st_size} bytes, more than a list of "
                f"areas ever needs ({MAX_AREAS_FILE}); pass the right file"
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise errors.NotFound(f"changed areas file {path} does not exist; fix "
                              "--changed-areas") from None
    except UnicodeDecodeError as e:
        raise errors.InvalidInput(
            f"changed areas file {path} is not UTF-8 text (byte {e.start}); pass JSON or "
            "OFFSET LENGTH lines"
        ) from None
    except OSError as e:
        raise errors.InvalidInput(f"cannot read changed areas file {path}: {e.strerror}") from e
    try:
        return tuple(extents.parse_areas(text))
    except ValueError as e:
        raise errors.InvalidInput(f"changed areas file {path}: {e}") from e


def image_format(path: str) -> str:
    """The image's format as qemu sees it, so qemu-nbd never has to guess."""
    done = subprocess.run(["qemu-img", "info", "--output=json", path],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise errors.InvalidInput(
            f"source {path} is not a disk image qemu can read: "
            f"{done.stderr.strip() or done.returncode}"
        )
    return str(json.loads(done.stdout)["format"])


def image_identity(path: str) -> str:
    """The image as a journal knows it: a resume after the image changed
    (copied over, written to) starts over instead of mixing two images."""
    st = os.stat(path)
    return f"file:{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def check_local_source(path: str) -> None:
    if not os.path.exists(path):
        raise errors.NotFound(
            f"source {path} does not exist; pass a disk image or an NBD URI "
            "(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)"
        )
    if os.path.isdir(path):
        raise errors.InvalidInput(f"source {path} is a directory; pass a disk image")
    if not os.access(path, os.R_OK):
        raise errors.FailedPrecondition(f"source {path} is not readable; fix its permissions")


@contextlib.contextmanager
def served(path: str, bitmap: str) -> Iterator[str]:
    """Serves a local image read-only with qemu-nbd on a private socket for
    as long as the block runs; yields the URI."""
    if shutil.which("qemu-nbd") is None:
        raise errors.FailedPrecondition(
            "qemu-nbd is not installed; install qemu-utils, or serve the image yourself "
            "and pass its NBD URI"
        )
    fmt = image_format(path)
    # The control plane's check of local images: a truncated qcow2 or vmdk
    # would otherwise be served, and copied, with zeros where data was.
    from controlplane.providers.disk_images import check_consistency

    check_consistency(path)
    with tempfile.TemporaryDirectory(prefix="ferry-copy-") as tmp:
        sock = os.path.join(tmp, "source.sock")
        pidfile = os.path.join(tmp, "qemu-nbd.pid")
        argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=32",
                f"--format={fmt}", f"--socket={sock}", f"--pid-file={pidfile}"]
        if bitmap:
            argv.append(f"--bitmap={bitmap}")
        # qemu-nbd goes when ferry copy goes, even killed with SIGKILL.
        proc = subprocess.Popen([*argv, path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=functools.partial(die_with_parent, os.getpid()))
        try:
            deadline = time.monotonic() + SERVER_START_SECONDS
            while not (os.path.exists(pidfile) and os.path.getsize(pidfile)):
                if proc.poll() is not None:
                    stderr = proc.stderr.read().decode().strip() if proc.stderr else ""
                    raise errors.InvalidInput(f"cannot serve source {path}: {stderr}")
                if time.monotonic() > deadline:
                    raise errors.Unavailable(
                        f"qemu-nbd did not start serving {path} within "
                        f"{SERVER_START_SECONDS:.0f} s"
                    )
                time.sleep(0.02)
            yield f"nbd+unix:///?socket={quote(sock)}"
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def progress_line(p: engine.Progress, rate: float, verifying: bool, bar: int = 0) -> str:
    """One progress report: percent, bytes, rate, ETA; with `bar` > 0, a bar
    that many characters wide in front."""
    if verifying:
        total, done, what = p.size, p.verified, "verified"
    else:
        total, done, what = p.planned, p.done, "copied"
    fraction = done / total if total else 1.0
    text = f"{fraction * 100:5.1f}% {_human(done)} of {_human(total)} {what}"
    if not verifying:
        text += f", {_human(rate)}/s"
        eta = p.eta()
        if eta:
            text += f", {eta:.0f} s left"
    if bar:
        filled = int(fraction * bar)
        text = f"[{'#' * filled}{'.' * (bar - filled)}] {text}"
    return text


async def _report(job: Job, out: TextIO, tty: bool) -> None:
    interval = 0.2 if tty else 1.0
    while True:
        await asyncio.sleep(interval)
        line = progress_line(job.progress, job.progress.rate(), job.progress.verifying,
                             bar=30 if tty else 0)
        out.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
        out.flush()


@dataclass
class Stop:
    """Where SIGINT and SIGTERM land. The first one cancels `task`: the
    set-up at first, the copy and verify once the job is open. Later ones,
    and any after the copy ended, are only noted, so the cleanup that
    follows (removing a target this copy created) is never cut short."""

    task: asyncio.Task[object]
    signals: list[int] = field(default_factory=list)

    def __call__(self, sig: int) -> None:
        self.signals.append(sig)
        if len(self.signals) == 1:
            self.task.cancel()


async def copy(args: argparse.Namespace, uri: str, source_id: str,
               areas: tuple[tuple[int, int], ...] | None, out: TextIO, stop: Stop,
               label: str = "") -> engine.Progress:
    options = CopyOptions(request_size=args.request_size, max_requests=args.requests,
                          connections=args.connections, profile=args.profile)
    spec = Spec(
        source_uri=uri,
        target_path=os.path.abspath(args.target),
        tuning=tuning_from(options, lambda name: FLAGS[name]),
        verify=args.verify,
        changed_areas=areas,
        dirty_bitmap=args.dirty_bitmap,
        source_id=source_id,
        source_label=label,
        direct=args.direct,
    )
    progress = engine.Progress()
    job = await Job.open(spec, progress)
    if progress.resumed:
        # Said with or without --progress: the run is a resume.
        out.write(f"resuming: {_human(progress.resumed)} of {_human(progress.size)} were "
                  f"copied by an earlier run ({job.journal.path})\n")
    tty = out.isatty()
    reporter = asyncio.create_task(_report(job, out, tty)) if args.progress else None
    # No await since the job opened: a stop from here on cancels this task
    # alone, never the cleanup below.
    stop.task = asyncio.create_task(job.run())
    try:
        try:
            await stop.task
        except BaseException as group:
            e = first_error(group)
            note = await job.abort()
            if isinstance(e, asyncio.CancelledError):
                raise errors.Cancelled(f"the copy was interrupted; {note}") from None
            if isinstance(e, errors.FerryError):
                raise type(e)(f"{e}; {note}") from e
            if isinstance(e, OSError):
                raise errors.OperationFailed(f"{errors.said(e)}; {note}") from e
            raise
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
    finally:
        await job.close()
    progress.finished = time.monotonic()
    if args.progress:
        summary = (f"copied {_human(progress.planned)} in {progress.elapsed:.1f} s over "
                   f"{job.connections} connection(s): read {_human(progress.read)}, zeroed "
                   f"{_human(progress.zeroed)}, skipped {_human(progress.skipped)}")
        if progress.resumed:
            summary += f", {_human(progress.resumed)} done by an earlier run"
        if job.checksum is not None:
            summary += f"; verified {job.checksum}"
        out.write(("\r\x1b[K" if tty else "") + summary + "\n")
    return progress


async def _main(args: argparse.Namespace) -> int:
    # SIGINT and SIGTERM stop the copy the way a cancel does: a target file
    # this copy created is removed (after SIGKILL it stays, with its journal,
    # and the same command resumes it). The exit status says which signal.
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stop = Stop(main)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        await _copy_as_asked(args, stop)
    except (errors.Cancelled, asyncio.CancelledError) as e:
        error = e if isinstance(e, errors.Cancelled) else errors.Cancelled(
            "the copy was interrupted before it started; nothing was written")
        if stop.signals:
            error.exit_code = 128 + stop.signals[0]
        raise error from None
    return 0


async def _copy_as_asked(args: argparse.Namespace, stop: Stop) -> None:
    if not args.target:
        raise errors.InvalidInput("the target is empty; pass a file or a block device")
    if args.changed_areas and args.dirty_bitmap:
        raise errors.InvalidInput("--changed-areas and --dirty-bitmap were both given; "
                                  "pass one of them")
    areas = read_areas(args.changed_areas) if args.changed_areas else None
    if not args.source:
        raise errors.InvalidInput("the source is empty; pass a disk image or an NBD URI")
    scheme = uri_scheme(args.source)
    if scheme in SCHEMES:
        await copy(args, args.source, args.source, areas, sys.stderr, stop)
        return
    if scheme:
        raise errors.InvalidInput(
            f"source {shown(args.source)!r} is a URI ferry copy cannot read (scheme {scheme!r}); "
            "pass an NBD URI "
            f"({', '.join(s + '://' for s in SCHEMES)}) or a disk image (a file whose name "
            "holds '://': pass it as ./NAME)"
        )
    path = os.path.abspath(args.source)
    check_local_source(path)
    target = os.path.abspath(args.target)
    if os.path.exists(target) and os.path.samefile(path, target):
        raise errors.InvalidInput(f"source and target are the same file ({path}); "
                                  "pass another target")
    # Before qemu-nbd starts, so these come first and cost nothing.
    check_target_for(target, bool(args.changed_areas or args.dirty_bitmap))
    with served(path, args.dirty_bitmap) as uri:
        await copy(args, uri, image_identity(path), areas, sys.stderr, stop, label=path)


def run_copy(args: argparse.Namespace) -> int:
    """The `ferry copy` command; raises FerryError for the CLI to report."""
    return int(uvloop.run(_main(args)))
