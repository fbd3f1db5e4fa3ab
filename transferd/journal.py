"""A journal of completed ranges, kept beside the target, so a transfer that
starts again after transferd died (SIGKILL, a node lost) copies only what was
not done.

The first line says what the journal is about (source, size, plan, which
target, whether the transfer created the target file); each later line is
one completed range, "OFFSET LENGTH HEAD TAIL", HEAD and TAIL digests of its
first and last bytes as written: before a resume trusts the journal, it
reads a sample of those back from both the target and the source, so a
target or source that changed since (truncated, copied over, re-attached)
is copied again rather than mixed. Ranges are appended only after the
target was flushed (fdatasync), so a range in the journal is on disk even
after a power loss. A torn last line (the process died while writing it) is
ignored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

from transferd.extents import normalize_areas

log = logging.getLogger(__name__)

SUFFIX = ".ferry-journal"
VERSION = 3
# Bytes at each end of a range whose digest the journal keeps.
SAMPLE = 4096
# The mark a journal puts on its target file, so that a file deleted and made
# again under the same name (even with the same inode number) is not trusted.
MARK_XATTR = "user.ferry.journal"
# What says which device backs a block device, where the kernel tells.
_BACKING = ("diskseq", "loop/backing_file", "loop/offset", "dm/uuid", "wwid", "device/wwid",
            "serial")
# Completed ranges are made durable and journaled this often.
CHECKPOINT_SECONDS = 1.0


def digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@functools.cache
def zeros_digest(length: int) -> str:
    return digest(bytes(length))


class Written(NamedTuple):
    """A range done, with the digests of its first and last SAMPLE bytes (or
    fewer, in a short range) as written."""

    offset: int
    length: int
    head: str
    tail: str

    @classmethod
    def of(cls, offset: int, length: int, data: memoryview | None) -> Written:
        """`data` is what was written; None for a range zeroed."""
        n = min(SAMPLE, length)
        if data is None:
            return cls(offset, length, zeros_digest(n), zeros_digest(n))
        return cls(offset, length, digest(data[:n]), digest(data[length - n:]))

    def samples(self) -> list[tuple[int, int, str]]:
        """(offset, length, digest) of the two ends."""
        n = min(SAMPLE, self.length)
        return [(self.offset, n, self.head), (self.offset + self.length - n, n, self.tail)]


@dataclass(frozen=True)
class Loaded:
    """A journal that applies: what was written, and whether the transfer
    created the target."""

    written: list[Written]
    created: bool
    done: list[tuple[int, int]]  # the written ranges, sorted and merged


@dataclass(frozen=True)
class Identity:
    """What must match for a journal to apply: the same source (as the caller
    names it, e.g. its URI), size and plan."""

    source: str
    size: int
    plan: str


# Longest file name most filesystems take.
NAME_MAX = 255


def journal_path(target_path: str, journal_dir: str, beside: bool) -> str:
    """Where the journal of a target goes, whatever name the target is
    given (./, a symbolic link): `beside` a file target when the name fits;
    else in `journal_dir` (for a block device, /dev is no place for files),
    under a name no other target maps to."""
    real = os.path.realpath(target_path)
    if beside and len(os.fsencode(os.path.basename(real) + SUFFIX)) <= NAME_MAX:
        return real + SUFFIX
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    return os.path.join(journal_dir, f"{os.path.basename(real)[:100]}-{digest}{SUFFIX}")


def _read_sysfs(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def target_identity(path: str) -> str:
    """Which target this is, as a journal checks before it is trusted: a
    file's device, inode, size and the journal's mark on it; a block
    device's number, size, disk sequence number (new at every attach) and,
    where the kernel says, what backs it (a loop device's file, a
    device-mapper UUID, a disk's WWID or serial).
    "" when the target does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ""
    if stat.S_ISBLK(st.st_mode):
        sysfs = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        backing = [_read_sysfs(f"{sysfs}/{name}") for name in _BACKING]
        return ":".join(["block", str(st.st_rdev), _read_sysfs(f"{sysfs}/size"), *backing])
    try:
        mark = os.getxattr(path, MARK_XATTR).decode(errors="replace")
    except OSError:
        mark = ""  # never marked, or the filesystem keeps no user attributes
    return f"file:{st.st_dev}:{st.st_ino}:{st.st_size}:{mark}"


def _mark(target_path: str) -> None:
    """Marks a file target anew (a block device takes no attributes)."""
    if stat.S_ISREG(os.stat(target_path).st_mode):
        with contextlib.suppress(OSError):
            os.setxattr(target_path, MARK_XATTR, uuid.uuid4().hex.encode())


def is_marked(target_path: str) -> bool:
    """A journal marked the file and no transfer completed it since."""
    try:
        os.getxattr(target_path, MARK_XATTR)
    except OSError:
        return False
    return True


def unmark(target_path: str) -> None:
    """Takes the mark off a complete target."""
    with contextlib.suppress(OSError):
        os.removexattr(target_path, MARK_XATTR)


def read_header(path: str) -> dict[str, object] | None:
    """The first line of the journal at `path`, or None when there is none
    (or it is unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        value = json.loads(first)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def load(path: str, identity: Identity, target_path: str) -> Loaded | None:
    """The journal at `path`, or None when there is none for this identity
    and this very target (a journal about another source, size, plan or
    target is ignored and later replaced). Its samples are not checked here."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return None
    try:
        header = json.loads(lines[0])
    except ValueError:
        log.warning("journal %s is unreadable; not using it", path)
        return None
    if header.get("version") != VERSION or Identity(
        header.get("source", ""), header.get("size", -1), header.get("plan", "")
    ) != identity:
        log.warning("journal %s is about another transfer (%s); not using it", path, header)
        return None
    if header.get("target") != target_identity(target_path):
        log.warning("journal %s is about another target than %s (it was replaced or changed "
                    "since); not using it", path, target_path)
        return None
    written: list[Written] = []
    # The last element follows the last newline: empty, or a torn line.
    for line in lines[1:-1]:
        fields = line.split()
        if (len(fields) != 4 or not all(x.isascii() and x.isdigit() for x in fields[:2])
                or not all(len(x) == 16 for x in fields[2:])):
            log.warning("journal %s has a malformed line %r; not using it", path, line)
            return None
        written.append(Written(int(fields[0]), int(fields[1]), fields[2], fields[3]))
    try:
        done = normalize_areas([(w.offset, w.length) for w in written], identity.size)
    except ValueError:
        log.warning("journal %s lists ranges outside the disk; not using it", path)
        return None
    return Loaded(written, bool(header.get("created")), done)


class Journal:
    """The open journal of one running transfer. `record` notes a range as
    written; `take` + `commit` make the noted ranges durable in the journal
    (after the caller has flushed the target)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.enabled = fd >= 0
        self._pending: list[Written] = []

    @classmethod
    def disabled(cls, path: str) -> Journal:
        """A journal that records nothing, for when `path` cannot be
        written: the transfer runs, it just cannot resume."""
        return cls(path, -1)

    @classmethod
    def create(cls, path: str, identity: Identity, created: bool,
               done: Sequence[Written], target_path: str) -> Journal:
        """Marks the (open) target, writes a fresh journal about it (header
        plus the ranges already done) and replaces any older one atomically."""
        _mark(target_path)
        tmp = path + ".tmp"
        header = json.dumps({"version": VERSION, **asdict(identity),
                             "target": target_identity(target_path), "created": created})
        body = "".join(_line(w) for w in done)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{header}\n{body}".encode())
            os.fsync(fd)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return cls(path, fd)

    def record(self, offset: int, length: int, data: memoryview | None) -> None:
        """Notes a range written (`data`, while it is at hand) or zeroed (None)."""
        if self.enabled:
            self._pending.append(Written.of(offset, length, data))

    def take(self) -> list[Written]:
        """The ranges recorded since the last take, neighbours merged where
        both are long enough that their ends are the merged range's ends."""
        pending, self._pending = self._pending, []
        pending.sort()
        merged: list[Written] = []
        for w in pending:
            last = merged[-1] if merged else None
            if (last is not None and last.offset + last.length == w.offset
                    and last.length >= SAMPLE and w.length >= SAMPLE):
                merged[-1] = Written(last.offset, last.length + w.length, last.head, w.tail)
            else:
                merged.append(w)
        return merged

    def commit(self, ranges: Sequence[Written]) -> None:
        """Appends ranges that are already durable on the target."""
        if ranges:
            os.write(self._fd, "".join(_line(w) for w in ranges).encode())
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        if not self.enabled:
            return
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _line(w: Written) -> str:
    return f"{w.offset} {w.length} {w.head} {w.tail}\n"
