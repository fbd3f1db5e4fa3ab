"""Transfer benchmark: transferd against nbdcopy, `qemu-img convert` and `cp`
on the same inputs, in one run.

    .venv/bin/python -m bench.transfer [--dir /dev/shm] [--repeat 3] [--only dense,sparse]

Inputs are generated under --dir (tmpfs /dev/shm by default, when it has
room) and removed at the end. Every NBD tool reads from the same nbdkit server
(file plugin, Unix socket); `cp` reads the file itself. For each tool and
workload it prints the median wall time of --repeat runs, MiB/s of virtual
disk size, CPU seconds (user + system of the client, not of the shared
server) per GiB of virtual size, and the client's peak RSS; then the ratios
transferd/nbdcopy and transferd/cp. Every target is checked against its
source, so a fast wrong copy cannot win.

Workloads (see bench/README.md): dense (random data), sparse (5 % allocated
in scattered 64 KiB - 4 MiB runs), vddk (nbdkit delay filter, 2 ms per read,
blocksize filter maxdata=2M, one connection for every tool), parallel (four
disks at once: four nbdcopy / cp processes, one transferd daemon with four
transfers).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from transferd.copy import parse_size as parse_copy_size

MiB = 1 << 20
GiB = 1 << 30
WORKLOADS = ("dense", "sparse", "vddk", "parallel")
PYTHON = sys.executable


@dataclass
class Result:
    workload: str
    tool: str
    wall: float  # seconds
    cpu: float  # user + system seconds of the client processes
    rss: int  # peak RSS of the largest client process, bytes
    size: int  # virtual bytes copied (over all disks)

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.wall

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.size / GiB)


@dataclass
class Measured:
    wall: float
    cpu: float
    rss: int


def timed(argv: Sequence[str], report: Path) -> list[str]:
    """Runs `argv` under GNU time, which reports the child's own CPU and peak
    RSS (a child forked from this Python process would inherit its RSS as
    the starting peak)."""
    return ["/usr/bin/time", "-f", "%U %S %M", "-o", str(report), *argv]


def read_time(report: Path) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) from a GNU time report."""
    user, system, rss_kib = report.read_text().split()[-3:]
    return float(user) + float(system), int(rss_kib) * 1024


def run_measured(argvs: Sequence[Sequence[str]], workdir: Path) -> Measured:
    """Runs the commands at once: the wall time of the whole batch, CPU
    summed, the largest peak RSS."""
    reports = [workdir / f"time{i}.txt" for i in range(len(argvs))]
    start = time.monotonic()
    procs = [subprocess.Popen(timed(a, r), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for a, r in zip(argvs, reports, strict=True)]
    errors = [p.communicate()[1].decode() for p in procs]
    wall = time.monotonic() - start
    for p, a, err in zip(procs, argvs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(a)} failed ({p.returncode}): {err}")
    cpu, rss = 0.0, 0
    for r in reports:
        c, m = read_time(r)
        cpu, rss = cpu + c, max(rss, m)
    return Measured(wall, cpu, rss)


class Nbdkit:
    """nbdkit serving one file read-only on a Unix socket."""

    def __init__(self, image: Path, sock: Path, filters: Sequence[str] = (),
                 params: Sequence[str] = ()) -> None:
        pidfile = sock.with_suffix(".pid")
        pidfile.unlink(missing_ok=True)
        sock.unlink(missing_ok=True)
        argv = ["nbdkit", "--foreground", "--readonly", "--exit-with-parent", f"--unix={sock}",
                f"--pid-file={pidfile}", *(f"--filter={f}" for f in filters),
                "file", str(image), *params]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        self.uri = f"nbd+unix:///?socket={sock}"
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not start: {argv}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@contextlib.contextmanager
def servers(images: Sequence[Path], workdir: Path, filters: Sequence[str] = (),
            params: Sequence[str] = ()) -> Iterator[list[Nbdkit]]:
    started: list[Nbdkit] = []
    try:
        for i, image in enumerate(images):
            started.append(Nbdkit(image, workdir / f"nbd{i}.sock", filters, params))
        yield started
    finally:
        for s in started:
            s.stop()


def write_dense(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


def write_sparse(path: Path, size: int, fraction: float, seed: int = 1) -> int:
    """Scattered runs of 64 KiB - 4 MiB of random data covering `fraction`
    of `size`; returns the bytes allocated."""
    rng = random.Random(seed)
    want = int(size * fraction)
    slots = size // (4 * MiB)
    chosen: set[int] = set()
    written = 0
    with path.open("wb") as f:
        f.truncate(size)
        while written < want and len(chosen) < slots:
            slot = rng.randrange(slots)
            if slot in chosen:
                continue
            chosen.add(slot)
            length = rng.randrange(16, 1025) * 4096  # 64 KiB .. 4 MiB
            offset = slot * 4 * MiB + rng.randrange(0, 4 * MiB - length + 1, 4096)
            f.seek(offset)
            f.write(os.urandom(length))
            written += length
    return written


def same(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)


# -- tools -------------------------------------------------------------------------

Command = Callable[[str, Path, Path], list[str]]  # (uri, source file, target) -> argv


def nbdcopy(connections: int = 0) -> Command:
    def argv(uri: str, src: Path, dst: Path) -> list[str]:
        extra = [f"--connections={connections}"] if connections else []
        return ["nbdcopy", *extra, uri, str(dst)]
    return argv


# Reads the source and throws the data away: the least time any NBD client
# can take on that server, however fast it writes.
SOURCE_FLOOR = "floor (nbdcopy to null:)"


def nbdcopy_null(uri: str, src: Path, dst: Path) -> list[str]:
    return ["nbdcopy", uri, "null:"]


def qemu_img(uri: str, src: Path, dst: Path) -> list[str]:
    return ["qemu-img", "convert", "-W", "-f", "raw", "-O", "raw", uri, str(dst)]


def cp(uri: str, src: Path, dst: Path) -> list[str]:
    return ["cp", "--sparse=auto", str(src), str(dst)]


def ferry_copy(*flags: str) -> Command:
    def argv(uri: str, src: Path, dst: Path) -> list[str]:
        return [PYTHON, "-m", "ferry.cli", "copy", *flags, uri, str(dst)]
    return argv


def bench_tools(label: str, tools: dict[str, Command], images: list[Path], workdir: Path,
                repeat: int, filters: Sequence[str] = (),
                params: Sequence[str] = ()) -> list[Result]:
    """Each tool copies every image (all at once when there are several),
    `repeat` rounds in which every tool runs once, so a burst of load from
    elsewhere on the machine falls on all tools alike rather than on the one
    running then; the run with the median wall time is kept."""
    size = sum(i.stat().st_size for i in images)
    runs: dict[str, list[Measured]] = {name: [] for name in tools}
    with servers(images, workdir, filters, params) as srv:
        for _ in range(repeat):
            for name, command in tools.items():
                targets = [workdir / f"target{i}.img" for i in range(len(images))]
                for t in targets:
                    t.unlink(missing_ok=True)
                runs[name].append(run_measured(
                    [command(s.uri, img, t) for s, img, t in zip(srv, images, targets,
                                                                 strict=True)], workdir))
                if name == SOURCE_FLOOR:
                    continue  # it writes nothing
                for img, t in zip(images, targets, strict=True):
                    if not same(img, t):
                        raise RuntimeError(f"{name} made a target that differs from {img}")
                    t.unlink()
    out: list[Result] = []
    for name, measured in runs.items():
        median = sorted(measured, key=lambda m: m.wall)[len(measured) // 2]
        out.append(Result(label, name, median.wall, median.cpu, median.rss, size))
        print(f"  {label:9} {name:24} {median.wall:7.2f} s "
              f"(runs: {', '.join(f'{r.wall:.2f}' for r in measured)})", flush=True)
    return out


def bench_daemon(label: str, images: list[Path], workdir: Path, repeat: int) -> Result:
    """One transferd daemon copying every image at once, through gRPC; its
    CPU and peak RSS are the daemon's own."""
    import grpc

    from ferry.v1 import transfer_pb2 as pb
    from ferry.v1 import transfer_pb2_grpc as pb_grpc

    size = sum(i.stat().st_size for i in images)
    runs: list[Measured] = []
    with servers(images, workdir) as srv:
        for _ in range(repeat):
            sock = workdir / "transferd.sock"
            report = workdir / "time-daemon.txt"
            daemon = subprocess.Popen(timed(
                [PYTHON, "-c", "import sys; from transferd.server import serve; "
                 "serve(sys.argv[1], '')", f"unix:{sock}"], report), stderr=subprocess.DEVNULL)
            try:
                with grpc.insecure_channel(f"unix:{sock}") as channel:
                    grpc.channel_ready_future(channel).result(timeout=60)
                    stub = pb_grpc.TransferServiceStub(channel)
                    start = time.monotonic()
                    ids = [stub.StartTransfer(pb.StartTransferRequest(
                        source_uri=s.uri, target_path=str(workdir / f"target{i}.img"))).id
                        for i, s in enumerate(srv)]
                    for tid in ids:
                        final = list(stub.WatchTransfer(
                            pb.WatchTransferRequest(transfer_id=tid, interval_ms=1000)))[-1]
                        if final.state != pb.TRANSFER_STATE_SUCCEEDED:
                            raise RuntimeError(f"transfer {tid} failed: {final.error}")
                    wall = time.monotonic() - start
            finally:
                # GNU time's child is the daemon; it stops on SIGTERM.
                children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children")
                for pid in children.read_text().split():
                    os.kill(int(pid), signal.SIGTERM)
                daemon.wait()
            cpu, rss = read_time(report)
            runs.append(Measured(wall, cpu, rss))
            for i, img in enumerate(images):
                t = workdir / f"target{i}.img"
                if not same(img, t):
                    raise RuntimeError(f"transferd made a target that differs from {img}")
                t.unlink()
    median = sorted(runs, key=lambda m: m.wall)[len(runs) // 2]
    name = "transferd (daemon)"
    print(f"  {label:9} {name:24} {median.wall:7.2f} s "
          f"(runs: {', '.join(f'{r.wall:.2f}' for r in runs)})", flush=True)
    return Result(label, name, median.wall, median.cpu, median.rss, size)


# -- report ------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    lines = ["| workload | tool | wall s | MiB/s | CPU s/GiB | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.workload} | {r.tool} | {r.wall:.2f} | {r.mib_s:.0f} | "
                     f"{r.cpu_per_gib:.2f} | {r.rss / MiB:.0f} |")
    lines += ["", "| workload | transferd/nbdcopy (wall) | transferd/cp (wall) "
              "| floor/cp (wall) |", "|---|---:|---:|---:|"]
    for workload in dict.fromkeys(r.workload for r in results):
        rows = {r.tool.split(" ")[0]: r for r in results if r.workload == workload}
        if "transferd" not in rows:
            continue
        ratios = [f"{rows[a].wall / rows[b].wall:.2f}" if a in rows and b in rows else "-"
                  for a, b in (("transferd", "nbdcopy"), ("transferd", "cp"),
                               ("floor", "cp"))]
        lines.append(f"| {workload} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def machine_note() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            f"at the end of the run")


def parse_size(text: str) -> int:
    """A size as `ferry copy` takes one (2G, 512M, 65536), more than 0."""
    size = parse_copy_size(text)
    if size == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; pass e.g. 2G or 512M")
    return size


def parse_repeat(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of runs; pass 1 or more")
    return int(text)


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "",
                    help="where inputs and targets go (default /dev/shm when it fits)")
    ap.add_argument("--dense-size", type=parse_size, default=2 * GiB,
                    help="size of the dense input, also the vddk one (default 2G)")
    ap.add_argument("--sparse-size", type=parse_size, default=16 * GiB,
                    help="virtual size of the sparse input, 5%% allocated (default 16G)")
    ap.add_argument("--parallel-size", type=parse_size, default=GiB,
                    help="size of each of the four disks copied at once (default 1G)")
    ap.add_argument("--repeat", type=parse_repeat, default=3,
                    help="runs per tool; the median is reported (default 3)")
    ap.add_argument("--transferd-flags", default="",
                    help="extra `ferry copy` flags for the dense and sparse runs, e.g. "
                    "'--connections 4'")
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    args = ap.parse_args(argv)
    chosen = [w for w in args.only.split(",") if w]
    if unknown := set(chosen) - set(WORKLOADS):
        ap.error(f"unknown workloads {sorted(unknown)}")
    need = 2 * args.dense_size + args.sparse_size // 10 + 5 * args.parallel_size
    base = args.dir
    if not base or shutil.disk_usage(base).free < need + GiB:
        base = os.path.join(os.environ.get("FERRY_CACHE_DIR")
                            or os.path.expanduser("~/.cache/ferry"), "bench")
        os.makedirs(base, exist_ok=True)
        print(f"{args.dir or 'tmpfs'} lacks room; using {base}", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="ferry-bench-", dir=base) as tmp:
        work = Path(tmp)
        dense = work / "dense.img"
        if {"dense", "vddk"} & set(chosen):
            write_dense(dense, args.dense_size)
        if "dense" in chosen:
            print("dense:", flush=True)
            results += bench_tools("dense", {
                "nbdcopy": nbdcopy(), "qemu-img convert": qemu_img, "cp": cp,
                "transferd (ferry copy)": ferry_copy(*args.transferd_flags.split()),
                SOURCE_FLOOR: nbdcopy_null,
            }, [dense], work, args.repeat)
        if "sparse" in chosen:
            sparse = work / "sparse.img"
            allocated = write_sparse(sparse, args.sparse_size, 0.05)
            print(f"sparse: {allocated / MiB:.0f} MiB allocated", flush=True)
            results += bench_tools("sparse", {
                "nbdcopy": nbdcopy(), "qemu-img convert": qemu_img, "cp": cp,
                "transferd (ferry copy)": ferry_copy(*args.transferd_flags.split()),
            }, [sparse], work, args.repeat)
            sparse.unlink()
        if "vddk" in chosen:
            print("vddk:", flush=True)
            results += bench_tools("vddk", {
                "nbdcopy": nbdcopy(connections=1),
                "transferd (ferry copy)": ferry_copy("--profile", "vddk", "--connections", "1"),
            }, [dense], work, args.repeat, filters=("blocksize", "delay"),
                params=("maxdata=2M", "rdelay=2ms"))
        dense.unlink(missing_ok=True)
        if "parallel" in chosen:
            disks = [work / f"disk{i}.img" for i in range(4)]
            for d in disks:
                write_dense(d, args.parallel_size)
            print("parallel:", flush=True)
            results += bench_tools("parallel", {"nbdcopy": nbdcopy(), "cp": cp},
                                   disks, work, args.repeat)
            results.append(bench_daemon("parallel", disks, work, args.repeat))
    report = f"{table(results)}\n\n{machine_note()}"
    print()
    print(report)
    return report


if __name__ == "__main__":
    main()
