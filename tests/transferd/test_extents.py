"""Extent planning: block-status replies to extents, extents to read / zero /
skip steps, steps to requests."""

from __future__ import annotations

import pytest

from transferd.extents import (
    STATE_HOLE,
    STATE_ZERO,
    Action,
    Extent,
    Kind,
    Step,
    changed_plan,
    from_block_status,
    from_dirty_bitmap,
    kind_of,
    merge,
    normalize_areas,
    parse_areas,
    plan,
    split,
    subtract,
)

DATA, ZERO, HOLE = Kind.DATA, Kind.ZERO, Kind.HOLE
READ, ZERO_IT, SKIP = Action.READ, Action.ZERO, Action.SKIP


@pytest.mark.parametrize(
    ("flags", "kind"),
    [(0, DATA), (STATE_HOLE, DATA), (STATE_ZERO, ZERO), (STATE_HOLE | STATE_ZERO, HOLE)],
)
def test_only_ranges_the_server_says_read_as_zero_are_left_unread(flags: int, kind: Kind):
    assert kind_of(flags) is kind


def test_block_status_reply_becomes_extents_from_the_asked_offset():
    entries = [4096, 0, 8192, 3, 512, 2]
    assert from_block_status(1000, entries, 1000 + 12800) == [
        Extent(1000, 4096, DATA), Extent(5096, 8192, HOLE), Extent(13288, 512, ZERO),
    ]


def test_reply_longer_than_asked_is_clipped_to_the_end():
    assert from_block_status(0, [1 << 20, 3, 1 << 20, 0], 1536) == [Extent(0, 1536, HOLE)]


def test_reply_shorter_than_asked_describes_only_what_it_covers():
    assert from_block_status(0, [4096, 0], 1 << 30) == [Extent(0, 4096, DATA)]


def test_unaligned_disk_end_cuts_the_partial_last_extent():
    size = 10 * 4096 + 123
    got = from_block_status(0, [10 * 4096, 3, 4096, 0], size)
    assert got == [Extent(0, 40960, HOLE), Extent(40960, 123, DATA)]
    assert got[-1].end == size


def test_zero_byte_disk_has_no_extents_and_no_steps():
    assert from_block_status(0, [], 0) == []
    assert from_block_status(0, [4096, 0], 0) == []
    assert plan([], target_reads_zero=True) == []


def test_zero_length_entries_are_ignored():
    assert from_block_status(0, [0, 0, 4096, 3, 0, 0, 4096, 3], 8192) == [
        Extent(0, 8192, HOLE)
    ]


def test_odd_reply_is_refused():
    with pytest.raises(ValueError, match="odd number"):
        from_block_status(0, [4096], 4096)


def test_adjacent_extents_of_one_kind_merge_and_others_do_not():
    got = merge([
        Extent(0, 10, DATA), Extent(10, 5, DATA), Extent(15, 5, ZERO),
        Extent(20, 5, HOLE), Extent(25, 0, DATA), Extent(25, 5, HOLE),
    ])
    assert got == [Extent(0, 15, DATA), Extent(15, 5, ZERO), Extent(20, 10, HOLE)]


def test_extents_with_a_gap_do_not_merge():
    assert merge([Extent(0, 10, DATA), Extent(20, 10, DATA)]) == [
        Extent(0, 10, DATA), Extent(20, 10, DATA)
    ]


EXTENTS = [Extent(0, 100, DATA), Extent(100, 50, ZERO), Extent(150, 50, HOLE),
           Extent(200, 10, DATA)]


def test_zero_and_hole_are_skipped_on_a_target_that_reads_as_zero():
    assert plan(EXTENTS, target_reads_zero=True) == [
        Step(0, 100, READ), Step(100, 100, SKIP), Step(200, 10, READ)
    ]


def test_zero_and_hole_are_zeroed_on_a_target_not_known_to_be_zero():
    assert plan(EXTENTS, target_reads_zero=False) == [
        Step(0, 100, READ), Step(100, 100, ZERO_IT), Step(200, 10, READ)
    ]


def test_plan_covers_every_byte_once():
    steps = plan(EXTENTS, target_reads_zero=False)
    assert [s.offset for s in steps] == [0, *(s.end for s in steps[:-1])]
    assert sum(s.length for s in steps) == EXTENTS[-1].end


@pytest.mark.parametrize(
    ("offset", "length", "size", "want"),
    [
        (0, 0, 4096, []),
        (0, 4096, 4096, [(0, 4096)]),
        (0, 10000, 4096, [(0, 4096), (4096, 4096), (8192, 1808)]),
        (1000, 10000, 4096, [(1000, 3096), (4096, 4096), (8192, 2808)]),
        (4096, 100, 4096, [(4096, 100)]),
        (4000, 200, 4096, [(4000, 96), (4096, 104)]),
    ],
)
def test_requests_are_bounded_and_aligned_to_the_request_size(
    offset: int, length: int, size: int, want: list[tuple[int, int]]
):
    assert list(split(offset, length, size)) == want


def test_split_refuses_a_request_size_of_zero():
    with pytest.raises(ValueError, match="positive"):
        list(split(0, 10, 0))


# -- changed areas, dirty bitmaps, resume -------------------------------------------


def test_areas_are_sorted_and_overlapping_or_touching_ones_merged():
    assert normalize_areas([(100, 50), (0, 10), (10, 5), (120, 100), (300, 0)], 1000) == [
        (0, 15), (100, 120)
    ]


@pytest.mark.parametrize(("areas", "message"), [
    ([(-1, 10)], "negative"),
    ([(0, -10)], "negative"),
    ([(990, 11)], "ends past the disk's end \\(1000 bytes\\)"),
])
def test_areas_outside_the_disk_are_refused(areas: list[tuple[int, int]], message: str):
    with pytest.raises(ValueError, match=message):
        normalize_areas(areas, 1000)


def test_dirty_bitmap_reply_becomes_dirty_areas_and_how_far_it_went():
    entries = [65536, 0, 131072, 1, 65536, 1, 65536, 0]
    assert from_dirty_bitmap(1 << 20, entries, 1 << 30) == (
        [((1 << 20) + 65536, 196608)], (1 << 20) + 327680
    )


def test_dirty_bitmap_reply_is_clipped_at_the_end():
    assert from_dirty_bitmap(0, [4096, 1, 1 << 20, 1], 10000) == ([(0, 10000)], 10000)


def test_changed_area_that_reads_as_zero_is_zeroed_even_on_a_zero_target():
    assert changed_plan(EXTENTS) == [Step(0, 100, READ), Step(100, 100, ZERO_IT),
                                     Step(200, 10, READ)]


@pytest.mark.parametrize(("done", "want"), [
    ([], [Step(0, 100, READ), Step(100, 100, SKIP)]),
    ([(0, 200)], []),
    ([(10, 20), (50, 100)], [Step(0, 10, READ), Step(30, 20, READ), Step(150, 50, SKIP)]),
    ([(0, 100)], [Step(100, 100, SKIP)]),
    ([(90, 20)], [Step(0, 90, READ), Step(110, 90, SKIP)]),
    ([(500, 10)], [Step(0, 100, READ), Step(100, 100, SKIP)]),
])
def test_done_ranges_are_left_out_of_the_plan(done: list[tuple[int, int]], want: list[Step]):
    assert subtract([Step(0, 100, READ), Step(100, 100, SKIP)], done) == want


@pytest.mark.parametrize(("text", "want"), [
    ('[{"start": 0, "length": 65536}, {"start": 1048576, "length": 4096}]',
     [(0, 65536), (1048576, 4096)]),
    ('{"changedArea": [{"start": 5, "length": 6}]}', [(5, 6)]),
    ("[[1, 2], [3, 4]]", [(1, 2), (3, 4)]),
    ("# CBT\n0 4096\n\n8192 512  # tail\n", [(0, 4096), (8192, 512)]),
    ("", []),
])
def test_changed_areas_parse_from_json_or_lines(text: str, want: list[tuple[int, int]]):
    assert parse_areas(text) == want


@pytest.mark.parametrize(("text", "message"), [
    ("[{", "not valid JSON"),
    ('{"x": 1}', "expected a JSON list"),
    ('[{"start": "0", "length": 1}]', "area 0 is"),
    ("[[1, true]]", "area 0 is"),
    ("0 4096\n12 x\n", "line 2 is '12 x'"),
    ("-5 10", "line 1"),
])
def test_changed_areas_that_do_not_parse_say_where(text: str, message: str):
    with pytest.raises(ValueError, match=message):
        parse_areas(text)
