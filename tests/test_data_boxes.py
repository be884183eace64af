"""Box and grounded-phrase text: strict formatting, tolerant parsing."""

import random

import pytest

from tinygptv.data.boxes import (
    Box,
    box_iou,
    denormalize_box,
    format_box,
    format_grounded,
    normalize_box,
    parse_box,
    parse_boxes,
    parse_grounded,
    strip_boxes,
)


def test_normalize_box_formats_and_rounding():
    # COCO-style [x, y, w, h] in a 200 x 100 image
    assert normalize_box([10, 20, 30, 40], 200, 100, fmt="xywh") == Box(5, 20, 20, 60)
    assert normalize_box([10, 20, 40, 60], 200, 100) == Box(5, 20, 20, 60)
    # rounding to nearest and clamping to 0-100
    assert normalize_box([1, 0, 199, 100], 200, 100) == Box(0, 0, 100, 100)
    assert normalize_box([-5, -5, 250, 130], 200, 100) == Box(0, 0, 100, 100)
    with pytest.raises(ValueError):
        normalize_box([0, 0, 1, 1], 0, 10)
    with pytest.raises(ValueError):
        normalize_box([0, 0, 1], 10, 10)
    with pytest.raises(ValueError):
        normalize_box([0, 0, 1, 1], 10, 10, fmt="cxcywh")


def test_denormalize_inverts_normalize_within_a_pixel():
    box = normalize_box([33, 47, 180, 90], 224, 224)
    x1, y1, x2, y2 = denormalize_box(box, 224, 224)
    assert abs(x1 - 33) <= 1.2 and abs(y1 - 47) <= 1.2 and abs(x2 - 180) <= 1.2 and abs(y2 - 90) <= 1.2


def test_format_box_exact_text():
    assert format_box(Box(10, 20, 50, 90)) == "{<10><20><50><90>}"
    assert format_box([(1, 2, 3, 4), (5, 6, 7, 8)]) == "{<1><2><3><4><delim><5><6><7><8>}"
    assert format_grounded(" a dog ", Box(10, 20, 50, 90)) == "<p>a dog</p> {<10><20><50><90>}"
    with pytest.raises(ValueError):
        format_box((0, 0, 101, 5))
    with pytest.raises(ValueError):
        format_box([])


def test_format_parse_round_trip_random_boxes():
    rng = random.Random(0)
    for _ in range(200):
        boxes = []
        for _ in range(rng.randint(1, 3)):
            x1, x2 = sorted(rng.randint(0, 100) for _ in range(2))
            y1, y2 = sorted(rng.randint(0, 100) for _ in range(2))
            boxes.append(Box(x1, y1, x2, y2))
        assert parse_boxes(format_box(boxes)) == boxes
        phrase = rng.choice(["a dog", "the red circle", "two cats"])
        assert parse_grounded(format_grounded(phrase, boxes)) == [(phrase, boxes)]


def test_parse_several_groups_in_running_text():
    text = "there is <p>a dog</p> {<10><20><50><90>} next to <p>two cats</p> {<1><2><3><4><delim><5><6><7><8>}."
    assert parse_grounded(text) == [
        ("a dog", [Box(10, 20, 50, 90)]),
        ("two cats", [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]),
    ]
    assert parse_boxes(text) == [Box(10, 20, 50, 90), Box(1, 2, 3, 4), Box(5, 6, 7, 8)]
    assert strip_boxes(text) == "there is a dog next to two cats."


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{<10><20><30>}", []),  # too few numbers: nothing
        ("{<10><20><30><40>", [Box(10, 20, 30, 40)]),  # missing closing brace
        ("<10><20><30><40>", [Box(10, 20, 30, 40)]),  # no braces
        ("{< 10 ><20.6><30><40>}", [Box(10, 21, 30, 40)]),  # spaces, decimals rounded
        ("{<130><-4><20><50>}", [Box(20, 0, 100, 50)]),  # clamped, corners reordered
        ("{<1><2><3><4><5><6>}", [Box(1, 2, 3, 4)]),  # incomplete second box dropped
        ("{<1><2>} garbage <3><4>", []),  # a run broken by text is not a box
        ("no box here", []),
        ("", []),
        ("{<a><b><c><d>}", []),
        ("{<10><20><30><40>} and then {<50><60><70><80>}", [Box(10, 20, 30, 40), Box(50, 60, 70, 80)]),
    ],
)
def test_parse_boxes_tolerates_malformed_output(text, expected):
    assert parse_boxes(text) == expected


def test_parse_box_first_or_none():
    assert parse_box("answer: {<5><6><7><8>} {<1><1><2><2>}") == Box(5, 6, 7, 8)
    assert parse_box("I cannot see it") is None


def test_parse_grounded_malformed():
    # missing </p>: the phrase ends at the box
    assert parse_grounded("<p>a dog {<10><20><50><90>}") == [("a dog", [Box(10, 20, 50, 90)])]
    # a phrase without a box, and a box that belongs to no phrase
    assert parse_grounded("<p>a cat</p> sits on {<1><2><3><4>}") == [("a cat", [])]
    # unterminated phrase at the end, empty phrase ignored
    assert parse_grounded("<p>a dog</p> {<1><2><3><4>} <p></p> <p>cat") == [("a dog", [Box(1, 2, 3, 4)]), ("cat", [])]
    assert parse_grounded("plain caption") == []


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
