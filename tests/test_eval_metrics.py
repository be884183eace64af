"""Metrics of the benchmarks, against hand-computed cases from their official definitions."""

import pytest

from tinygptv.data.shapes import Scene, ShapeObject
from tinygptv.eval import get_benchmark
from tinygptv.eval.metrics import (
    auroc,
    exact_match,
    match_choice,
    normalize_answer,
    refer_iou,
    substring_match,
    vqa_accuracy,
    yes_no,
)
from tinygptv.eval.report import report_table
from tinygptv.eval.runner import Item
from tinygptv.eval.shapes import caption_f1, grounding_f1, named_pairs, objects_described

# --- VQA accuracy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "matches, expected",
    # m of the 10 humans gave the answer. A subset that leaves out one of the m has m-1 matches,
    # the other 10-m subsets have m: acc = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matches, expected):
    humans = ["red"] * matches + ["blue"] * (10 - matches)
    assert vqa_accuracy("red", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_the_prediction():
    humans = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("Two.", humans) == pytest.approx(0.9)  # "Two." -> "two" -> "2"
    assert vqa_accuracy("the dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 2 + ["do"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("", ["yes"] * 10) == 0.0


def test_vqa_accuracy_keeps_the_official_quirk_of_identical_human_answers():
    # Ten identical human answers are left as they are; the prediction is still normalised
    # ("t-shirt" -> "t shirt"), so it misses. One different answer switches the humans'
    # punctuation normalisation on and the same prediction gets full credit.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two.", "2"),
        ("the dog", "dog"),
        ("dont", "don't"),
        ("An apple", "apple"),
        ("1,000", "1000"),  # a digit-comma-digit group removes every punctuation mark
        ("2.5", "2.5"),  # a period before a digit stays
        ("yes!", "yes"),
        ("red/blue", "red blue"),
        ("None", "0"),  # the official number map sends "none" to "0"
        ("  Ten\tdogs\n", "10 dogs"),
    ],
)
def test_normalisation_edge_cases(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_and_lenient_substring_are_different_rules():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("yes, it is", "yes") == 0.0
    assert substring_match("yes, it is", "yes") == 1.0
    assert substring_match("not sure", ["false", "no"]) == 1.0  # the lenient rule's weakness, kept labelled
    assert substring_match("true and yes", ["true", "yes"]) == 1.0  # counted once, never twice
    assert substring_match("anything", [""]) == 0.0  # an empty label gives no free credit


# --- choices, yes/no, AUROC -----------------------------------------------------------------------


def test_match_choice():
    assert match_choice("3 dogs", ["3", "3 dogs", "4"]) == 1
    assert match_choice("I think 4.", ["3", "3 dogs", "4"]) == 2
    assert match_choice("three", ["3", "3 dogs", "4"]) == 0
    assert match_choice("3 or 4", ["3", "3 dogs", "4"]) is None
    assert match_choice("it is dark red", ["red", "dark red"]) == 1
    assert match_choice("purple", ["red", "dark red"]) is None


def test_yes_no_reads_words_not_substrings():
    assert yes_no("Yes, it is.") == 1
    assert yes_no("No") == 0
    assert yes_no("I do not know") is None
    assert yes_no("nope") is None
    assert yes_no("no, yes") == 0


def test_auroc_hand_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert auroc([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert auroc([1, 1], [0.2, 0.3]) is None


# --- boxes ------------------------------------------------------------------------------------------


def _refer_item(box, width=100, height=100):
    return Item(question_id=1, image=None, text="", target=box, task="refer", meta={"width": width, "height": height})


@pytest.mark.parametrize(
    "answer, target, right, iou",
    [
        ("{<0><0><50><50>}", (0, 0, 50, 50), True, 1.0),
        ("{<0><0><50><50>}", (50, 0, 100, 50), False, 0.0),  # touching along an edge
        ("{<0><0><100><100>}", (25, 25, 75, 75), False, 0.25),  # contains the target
        ("{<0><0><100><60>}", (0, 0, 100, 100), True, 0.6),  # contained, 60 % of it
        ("{<0><0><100><50>}", (0, 0, 100, 100), False, 0.5),  # exactly 0.5 is not above 0.5
        ("{<10><10><10><50>}", (10, 10, 10, 50), False, 0.0),  # empty boxes match nothing
        ("I cannot see it", (0, 0, 50, 50), False, 0.0),  # no box: wrong
    ],
)
def test_refer_scoring_iou_edge_cases(answer, target, right, iou):
    benchmark = get_benchmark("refcoco")
    record = benchmark.score(_refer_item(target), {"answer": answer})
    assert record["score"] == float(right)
    assert record["iou"] == pytest.approx(iou)


def test_refer_boxes_are_scaled_to_the_image_and_threshold_is_a_setting():
    # 0-100 coordinates of a 200 x 50 image: {<25><0><75><100>} is x 50-150, y 0-50.
    iou, box = refer_iou("{<25><0><75><100>}", (50, 0, 150, 50), 200, 50)
    assert iou == pytest.approx(1.0) and box == [50.0, 0.0, 150.0, 50.0]
    strict = get_benchmark("refcoco", iou_threshold=0.7)
    assert strict.protocol.settings["iou_threshold"] == 0.7
    assert strict.score(_refer_item((0, 0, 100, 100)), {"answer": "{<0><0><100><60>}"})["score"] == 0.0


# --- the shapes world's scoring ------------------------------------------------------------------


def _scene(*objects):
    return Scene(0, "test", "gray", "plain", [ShapeObject(s, c, z, (0.5, 0.5), 0.1, b) for s, c, z, b in objects])


def test_identify_needs_a_phrase_that_picks_out_the_object_alone():
    scene = _scene(
        ("star", "red", "small", (10, 10, 40, 40)),
        ("star", "blue", "large", (150, 150, 210, 210)),
        ("circle", "red", "large", (150, 10, 200, 60)),
    )
    assert objects_described("the red star", scene.objects) == [0]
    assert objects_described("the star", scene.objects) == [0, 1]  # ambiguous: not the answer
    assert objects_described("the small red star", scene.objects) == [0]
    assert objects_described("the large red star", scene.objects) == []
    assert objects_described("the blue star at the bottom right", scene.objects) == [1]
    assert objects_described("the blue star on the left", scene.objects) == []
    assert objects_described("a red thing", scene.objects) == []


def test_caption_and_grounding_f1():
    scene = _scene(
        ("star", "red", "small", (10, 10, 40, 40)),
        ("circle", "blue", "large", (150, 150, 210, 210)),
        ("circle", "blue", "small", (150, 10, 180, 40)),
    )
    assert named_pairs("a small red star and two blue circles")[("blue", "circle")] == 2
    assert caption_f1("a small red star and two blue circles", scene) == pytest.approx(1.0)
    assert caption_f1("a red star", scene) == pytest.approx(0.5)  # 1 right of 1 named, of 3 objects
    assert caption_f1("a green square", scene) == 0.0
    # boxes in 0-100 of the 224-px image
    right = "<p>a red star</p> {<4><4><18><18>} and <p>a large blue circle</p> {<67><67><94><94>}"
    assert grounding_f1(right, scene) == pytest.approx(2 * 2 / (2 + 3))
    wrong_colour = "<p>a green star</p> {<4><4><18><18>}"
    assert grounding_f1(wrong_colour, scene) == 0.0
    assert grounding_f1("no boxes here", scene) == 0.0


# --- the report -------------------------------------------------------------------------------------


def test_report_puts_the_paper_beside_each_model():
    def result(benchmark, model, **metrics):
        return {"benchmark": benchmark, "model": model, "metrics": metrics, "title": benchmark}

    results = [
        result("gqa", "mine", accuracy=30.0, accuracy_lenient=40.0),
        result("vsr", "mine", accuracy=50.0, accuracy_lenient=52.0),
        result("iconqa", "mine", accuracy=41.0),
        result("vizwiz", "mine", accuracy=30.0),
        result("hm", "mine", accuracy=50.0, auroc=55.0),
        result("okvqa", "mine", accuracy=20.0),
        result("gqa", "other", accuracy=1.0, accuracy_lenient=2.0),
    ]
    table = report_table(results)
    lines = table.splitlines()
    assert lines[0] == "| benchmark | metric | paper | mine | other |"
    assert "| gqa | substring (the paper's rule) | 38.9 | 40.0 | 2.0 |" in lines
    assert "| gqa | exact match | - | 30.0 | 1.0 |" in lines
    assert "| hm | AUROC | - | 55.0 | - |" in lines
    assert "| okvqa | accuracy | - | 20.0 | - |" in lines
    # average of the paper-comparable scores: (40 + 52 + 41 + 30 + 50) / 5 = 42.6; "other" lacks four
    assert "| average of the five | paper's rules | 46.0 | 42.6 | - |" in lines
