"""Extent planning, apart from any I/O so it is tested fast and exhaustively.

A source describes its disk as extents (data, zero, hole) from NBD
`base:allocation` block status. The plan turns them into actions on the
target: read + write data, zero what reads as zero, or skip it when the target
is already known to read as zero (a freshly truncated file). Reads are split
into requests no larger than the request size, aligned to it so consecutive
requests line up with the source's and the target's blocks.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

# NBD base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO), kept here so the
# planning does not import libnbd.
STATE_HOLE = 1
STATE_ZERO = 2


class Kind(enum.Enum):
    DATA = "data"  # must be read
    ZERO = "zero"  # reads as zero; allocated on the source
    HOLE = "hole"  # reads as zero; not allocated on the source


class Action(enum.Enum):
    READ = "read"
    ZERO = "zero"
    SKIP = "skip"


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: Kind

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Step:
    """One planned range: what to do with [offset, offset + length)."""

    offset: int
    length: int
    action: Action

    @property
    def end(self) -> int:
        return self.offset + self.length


def kind_of(flags: int) -> Kind:
    """A range is only safe to leave unread when the server says it reads as
    zero; a hole that is not also zero (possible with some backends) is data."""
    if flags & STATE_ZERO:
        return Kind.HOLE if flags & STATE_HOLE else Kind.ZERO
    return Kind.DATA


def from_block_status(offset: int, entries: Sequence[int], end: int) -> list[Extent]:
    """Turns a base:allocation reply (flat [length, flags, length, flags, ...]
    starting at `offset`) into extents clipped to `end`.

    Servers may describe less than was asked (the caller asks again from the
    last end) or more (the excess is dropped). Zero-length entries are
    ignored."""
    if len(entries) % 2:
        raise ValueError(f"block status reply has an odd number of entries: {len(entries)}")
    out: list[Extent] = []
    pos = offset
    for i in range(0, len(entries), 2):
        length, flags = entries[i], entries[i + 1]
        if pos >= end:
            break
        length = min(length, end - pos)
        if length <= 0:
            continue
        out.append(Extent(pos, length, kind_of(flags)))
        pos += length
    return merge(out)


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Merges adjacent extents of the same kind so a run of small data extents
    becomes one read range (split again by request size later)."""
    out: list[Extent] = []
    for e in extents:
        if e.length == 0:
            continue
        if out and out[-1].kind == e.kind and out[-1].end == e.offset:
            out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.kind)
        else:
            out.append(e)
    return out


def plan(extents: Iterable[Extent], target_reads_zero: bool) -> list[Step]:
    """Chooses an action per extent and merges neighbours with the same one.

    Zero and hole extents are never read. They are skipped when the target
    already reads as zero, and zeroed otherwise (a block device is never known
    to be zero)."""
    steps: list[Step] = []
    for e in extents:
        if e.kind is Kind.DATA:
            action = Action.READ
        else:
            action = Action.SKIP if target_reads_zero else Action.ZERO
        if steps and steps[-1].action is action and steps[-1].end == e.offset:
            steps[-1] = Step(steps[-1].offset, steps[-1].length + e.length, action)
        else:
            steps.append(Step(e.offset, e.length, action))
    return steps


def split(offset: int, length: int, request_size: int) -> Iterator[tuple[int, int]]:
    """Splits [offset, offset + length) into (offset, length) requests of at
    most `request_size` bytes whose boundaries fall on multiples of it."""
    if request_size <= 0:
        raise ValueError(f"request size must be positive, not {request_size}")
    pos, end = offset, offset + length
    while pos < end:
        boundary = (pos // request_size + 1) * request_size
        n = min(boundary, end) - pos
        yield pos, n
        pos += n


# -- changed areas and resume ------------------------------------------------------
#
# An "area" is an (offset, length) range of the disk. A full copy covers one
# area, the whole disk; an incremental copy covers the areas that changed (a
# CBT list, a dirty bitmap); a resumed copy leaves out the ranges a journal
# says are done.


def normalize_areas(areas: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Sorts and merges overlapping or touching areas. An area with a negative
    offset or length, or reaching past the disk's end, is an error: the list
    was made for another disk."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(areas):
        if offset < 0 or length < 0:
            raise ValueError(f"area at offset {offset} of length {length} is negative")
        if offset + length > size:
            raise ValueError(
                f"area at offset {offset} of length {length} ends past the disk's "
                f"end ({size} bytes)"
            )
        if length == 0:
            continue
        if out and offset <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], offset + length) - start)
        else:
            out.append((offset, length))
    return out


def from_dirty_bitmap(
    offset: int, entries: Sequence[int], end: int
) -> tuple[list[tuple[int, int]], int]:
    """Turns a `qemu:dirty-bitmap:NAME` reply (flag 1 = dirty) starting at
    `offset` into the dirty areas it describes, clipped to `end`, and the
    offset up to which it describes the disk (the caller asks again from there)."""
    if len(entries) % 2:
        raise ValueError(f"block status reply has an odd number of entries: {len(entries)}")
    areas: list[tuple[int, int]] = []
    pos = offset
    for i in range(0, len(entries), 2):
        length = min(entries[i], end - pos)
        if length <= 0:
            continue
        if entries[i + 1] & 1:
            areas.append((pos, length))
        pos += length
    return normalize_areas(areas, end), pos


def changed_plan(extents: Iterable[Extent]) -> list[Step]:
    """The plan inside changed areas: the target holds an older copy, so an
    area that now reads as zero must be zeroed, never skipped."""
    return plan(extents, target_reads_zero=False)


def subtract(steps: Iterable[Step], done: Sequence[tuple[int, int]]) -> list[Step]:
    """Removes the ranges in `done` (sorted, merged) from `steps`: what a
    resumed transfer has left to do."""
    out: list[Step] = []
    i = 0
    for s in steps:
        pos = s.offset
        while i < len(done) and done[i][0] + done[i][1] <= pos:
            i += 1
        j = i
        while pos < s.end:
            if j >= len(done) or done[j][0] >= s.end:
                out.append(Step(pos, s.end - pos, s.action))
                break
            d_start, d_end = done[j][0], done[j][0] + done[j][1]
            if d_start > pos:
                out.append(Step(pos, d_start - pos, s.action))
            pos = max(pos, d_end)
            j += 1
    return out


def total(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(length for _, length in ranges)


def parse_areas(text: str) -> list[tuple[int, int]]:
    """Reads a list of changed areas: JSON, either vSphere's
    `[{"start": N, "length": N}, ...]` (QueryChangedDiskAreas) or
    `[[OFFSET, LENGTH], ...]`; or text with one "OFFSET LENGTH" per line
    (blank lines and # comments ignored)."""
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            doc = json.loads(stripped)
        except ValueError as e:
            raise ValueError(f"not valid JSON: {e}") from e
        except RecursionError:
            raise ValueError("JSON nested too deeply to be a list of areas") from None
        if isinstance(doc, dict):
            doc = doc.get("changedArea", doc.get("changed_areas"))
        if not isinstance(doc, list):
            raise ValueError("expected a JSON list of areas")
        out = []
        for i, item in enumerate(doc):
            if isinstance(item, dict):
                pair = (item.get("start", item.get("offset")), item.get("length"))
            elif isinstance(item, list) and len(item) == 2:
                pair = (item[0], item[1])
            else:
                pair = (None, None)
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                       for x in pair):
                raise ValueError(
                    f"area {i} is {item!r}; expected {{\"start\": N, \"length\": N}} "
                    "or [OFFSET, LENGTH] with integers of 0 or more"
                )
            out.append((int(pair[0]), int(pair[1])))  # type: ignore[arg-type]
        return out
    areas = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or not all(f.isascii() and f.isdigit() for f in fields):
            raise ValueError(f"line {number} is {line!r}; expected OFFSET LENGTH in bytes")
        areas.append((int(fields[0]), int(fields[1])))
    return areas
