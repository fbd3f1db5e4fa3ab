"""A VM made of local disk images (raw, qcow2, vmdk), optionally described by a
VMware .vmx beside the first disk. Images are checked with `qemu-img info` and
served read-only over NBD by qemu-nbd; the source is never opened for writing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from controlplane.providers.vmx import VmxDescriptor, parse_vmx
from ferry import errors

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("raw", "qcow2", "vmdk")
ACCEPTED = "a raw disk image with an MBR or GPT partition table, a qcow2 or a vmdk image"
QEMU_IMG_TIMEOUT = 60.0
NBD_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int


class ImageProblem(errors.InvalidInput):
    """An image that cannot be migrated; `kind` is the Condition type."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def has_partition_table(head: bytes) -> bool:
    """MBR boot signature at 510, or a GPT header in LBA 1 for 512- or
    4096-byte sectors. qemu-img calls any file "raw", so this is what tells a
    raw disk from a stray file."""
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return True
    if head[512:520] == b"EFI PART":
        return True
    return head[4096:4104] == b"EFI PART"


def _qemu_img_info(path: str) -> dict[str, object]:
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", path],
            capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False,
        )
    except FileNotFoundError as e:
        raise errors.FailedPrecondition(
            "qemu-img is not installed; install qemu-utils (make setup does)"
        ) from e
    if out.returncode != 0:
        detail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no output"
        raise ImageProblem(
            "UnreadableImage", f"{path} cannot be read as a disk image ({detail}); pass {ACCEPTED}"
        )
    doc = json.loads(out.stdout)
    if not isinstance(doc, dict):
        raise ImageProblem("UnreadableImage", f"qemu-img info gave no description of {path}")
    return doc


def inspect_image(path: str) -> ImageInfo:
    """Checks one image: it exists, is a regular file, is raw/qcow2/vmdk, is
    not encrypted, has no backing file outside its own directory, and (raw)
    carries a partition table. Raises ImageProblem naming the file and the fix."""
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            try:
                p.resolve(strict=True)
            except RuntimeError:
                raise ImageProblem(
                    "DiskNotFound", f"disk image {path} is a symlink loop; point it at the image"
                ) from None
            except OSError:
                pass
            raise ImageProblem(
                "DiskNotFound",
                f"disk image {path} is a symlink to {os.readlink(path)}, which does not exist; "
                "check the path",
            )
        raise ImageProblem("DiskNotFound", f"disk image {path} does not exist; check the path")
    if not p.is_file():
        raise ImageProblem(
            "NotADiskImage", f"{path} is not a regular file; pass {ACCEPTED}"
        )
    if not os.access(path, os.R_OK):
        raise ImageProblem(
            "DiskNotReadable", f"disk image {path} is not readable; fix its permissions"
        )
    _check_extents(path)
    doc = _qemu_img_info(path)
    fmt = str(doc.get("format", ""))
    size_value = doc.get("virtual-size", 0)
    size = int(size_value) if isinstance(size_value, int) else 0
    if fmt not in SUPPORTED_FORMATS:
        raise ImageProblem(
            "UnsupportedImageFormat",
            f"{path} is a {fmt} image, which Ferry does not read; convert it with "
            f"`qemu-img convert -O qcow2 {shlex.quote(path)} OUT.qcow2` or pass {ACCEPTED}",
        )
    if doc.get("encrypted"):
        raise ImageProblem(
            "EncryptedImage",
            f"{path} is encrypted; decrypt it first (qemu-img convert with the key) "
            "because Ferry does not handle image keys",
        )
    backing = doc.get("full-backing-filename") or doc.get("backing-filename")
    if backing:
        _check_backing(path, str(backing))
    if fmt != "raw":
        check_consistency(path)
    if fmt == "raw":
        with open(path, "rb") as f:
            head = f.read(4104)
        if not has_partition_table(head):
            why = "it is empty" if size == 0 else "it has no MBR or GPT partition table"
            raise ImageProblem(
                "NotADiskImage", f"{path} is not a disk image: {why}; pass {ACCEPTED}"
            )
    if size <= 0:
        raise ImageProblem("NotADiskImage", f"{path} has a virtual size of 0; pass {ACCEPTED}")
    return ImageInfo(path=str(p.resolve()), format=fmt, virtual_size=size)


def _corrupt(path: str, detail: str) -> ImageProblem:
    return ImageProblem(
        "CorruptImage",
        f"disk image {path} is truncated or corrupt (qemu-img check: {detail}); "
        "copy it again from the datastore",
    )


def check_consistency(path: str) -> None:
    """`qemu-img info` only reads the header, so a truncated qcow2/vmdk passes
    it and would be copied as zeros; `qemu-img check` walks the metadata
    (fast: no data is read). Exit 3 means leaked clusters only, which lose no
    data; 63 means the format has no check."""
    try:
        out = subprocess.run(
            ["qemu-img", "check", "--output=json", "-U", path],
            capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise errors.Unavailable(
            f"qemu-img check on {path} did not finish within {QEMU_IMG_TIMEOUT:.0f} s; "
            "the machine may be overloaded, try again"
        ) from e
    if out.returncode in (0, 3, 63):
        return
    errs = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    first = next((line for line in errs if line.startswith("ERROR")), errs[0] if errs else "")
    summary = ""
    with contextlib.suppress(ValueError):
        doc = json.loads(out.stdout)
        if isinstance(doc, dict) and doc.get("corruptions"):
            summary = f"{doc['corruptions']} corruptions"
    detail = "; ".join(x for x in (summary, first[:200]) if x) or f"exit {out.returncode}"
    raise _corrupt(path, detail)


_EXTENT_LINE = re.compile(
    rb'^\s*(?:RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"\n]*)"', re.MULTILINE
)


def _check_extents(path: str) -> None:
    """A vmdk descriptor may name extent files anywhere (even /etc/shadow or
    /dev/sda); like backing files, they must be regular files in the image's
    own directory. Read from the descriptor itself before qemu-img opens
    anything, since opening a FIFO extent would hang. Also catches a flat
    extent cut short."""
    with open(path, "rb") as f:
        head = f.read(65536)
    if not (head.startswith(b"KDMV") or b"# Disk DescriptorFile" in head):
        return
    own = Path(path).resolve()
    base = own.parent
    for match in _EXTENT_LINE.finditer(head):
        sectors, kind = int(match.group(1)), match.group(2).decode(errors="replace")
        name = match.group(3).decode(errors="replace")
        target = (Path(name) if os.path.isabs(name) else base / name).resolve()
        if target == own:
            continue
        if target.parent != base:
            raise ImageProblem(
                "ExtentOutsideDirectory",
                f"{path} has the extent file {name} outside {base}; copy the extent into "
                "that directory or convert the image with "
                f"`qemu-img convert -O qcow2 {shlex.quote(path)} OUT.qcow2`",
            )
        if not target.is_file():
            raise ImageProblem(
                "ExtentNotAFile",
                f"{path} has the extent {name}, which is not a regular file; "
                "Ferry only copies image files, never devices",
            )
        have = target.stat().st_size
        if kind == "FLAT" and have < sectors * 512:
            raise _corrupt(path, f"flat extent {name} holds {have} of {sectors * 512} bytes")


def _check_backing(path: str, backing: str) -> None:
    """A backing chain may only use files in the image's own directory, so a
    crafted image cannot make Ferry read (and copy out) an unrelated file."""
    base = Path(path).resolve().parent
    target = Path(backing) if os.path.isabs(backing) else base / backing
    target = target.resolve()
    if target.parent != base:
        raise ImageProblem(
            "BackingFileOutsideDirectory",
            f"{path} has the backing file {backing} outside {base}; flatten it with "
            f"`qemu-img convert -O qcow2 {shlex.quote(path)} OUT.qcow2` or move the chain "
            "into one directory",
        )
    if not target.is_file():
        raise ImageProblem(
            "BackingFileMissing",
            f"{path} needs the backing file {target}, which does not exist; restore it or "
            "pass a flattened image",
        )
    inspect_backing = _qemu_img_info(str(target))
    nested = inspect_backing.get("full-backing-filename") or inspect_backing.get(
        "backing-filename"
    )
    if nested:
        _check_backing(str(target), str(nested))


def find_vmx(first_disk: str) -> Path | None:
    """The .vmx beside the first disk: `<stem>.vmx`, else the only .vmx in the
    directory that names the disk."""
    disk = Path(first_disk)
    same_stem = disk.with_suffix(".vmx")
    if same_stem.is_file():
        return same_stem
    candidates: list[Path] = []
    with contextlib.suppress(OSError):
        for vmx in sorted(disk.parent.glob("*.vmx")):
            # Only regular files: a FIFO would block the read forever and a
            # directory cannot be read at all.
            if not vmx.is_file():
                continue
            descriptor = read_vmx(vmx)
            if any(Path(d).name == disk.name for d in descriptor.disks):
                candidates.append(vmx)
    return candidates[0] if len(candidates) == 1 else None


def read_vmx(path: Path) -> VmxDescriptor:
    try:
        return parse_vmx(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        raise errors.InvalidInput(f"cannot read {path}: {e.strerror}; fix its permissions") from e


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def vm_name_from(first_disk: str, descriptor: VmxDescriptor | None) -> str:
    """A VM name usable as a directory name: the .vmx displayName, else the
    first disk's file name without extension."""
    raw = (descriptor.display_name if descriptor else "") or Path(first_disk).stem
    name = _NAME_UNSAFE.sub("-", raw).strip("-.")
    return name or "vm"


def export_command(image: ImageInfo, socket_path: str, shared: int) -> list[str]:
    return [
        "qemu-nbd", "--read-only", f"--format={image.format}", f"--socket={socket_path}",
        "--persistent", f"--shared={shared}", image.path,
    ]


def nbd_uri(socket_path: str) -> str:
    return f"nbd+unix:///?socket={socket_path}"


async def _answers(socket_path: str) -> bool:
    """True once the server sends the NBD greeting ("NBDMAGIC")."""
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path)
    except OSError:
        return False
    try:
        greeting = await asyncio.wait_for(reader.readexactly(8), timeout=5)
        return greeting == b"NBDMAGIC"
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve_image(image: ImageInfo, socket_path: str, shared: int = 4) -> AsyncIterator[str]:
    """Serves one image read-only over NBD on a Unix socket for the lifetime
    of the context and yields its NBD URI. qemu-nbd is always stopped, on
    failure and on cancellation too."""
    if shutil.which("qemu-nbd") is None:
        raise errors.FailedPrecondition("qemu-nbd is not installed; install qemu-utils")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    proc = await asyncio.create_subprocess_exec(
        *export_command(image, socket_path, shared),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_ready(proc, image, socket_path)
        yield nbd_uri(socket_path)
    finally:
        await _stop(proc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


async def _wait_ready(proc: asyncio.subprocess.Process, image: ImageInfo, sock: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + NBD_START_TIMEOUT
    while loop.time() < deadline:
        if proc.returncode is not None:
            stderr = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
            raise errors.OperationFailed(
                f"qemu-nbd could not serve {image.path}: {stderr.strip() or 'it exited'}; "
                "check that no other program holds the image open for writing"
            )
        if os.path.exists(sock) and await _answers(sock):
            return
        await asyncio.sleep(0.05)
    raise errors.Unavailable(
        f"qemu-nbd serving {image.path} did not answer on {sock} within "
        f"{NBD_START_TIMEOUT:.0f} s; the machine may be overloaded, try again"
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.shield(asyncio.wait_for(proc.wait(), timeout=10))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    log.debug("qemu-nbd pid %d stopped", proc.pid)
