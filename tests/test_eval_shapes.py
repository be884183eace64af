"""`tinygptv eval shapes` and `evaluate_shapes` on a generated shapes world."""

import json
import pickle

import pytest
import torch

from tinygptv.cli import main
from tinygptv.data.boxes import format_box, format_grounded, normalize_box
from tinygptv.data.shapes import load_scenes, make_shapes
from tinygptv.eval import get_benchmark
from tinygptv.eval.shapes import SHAPES_TASKS, evaluate_shapes, format_shapes_table
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.testing import word_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-world") / "world"
    make_shapes(root, n=40, seed=0)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes-model") / "tiny"
    torch.manual_seed(0)
    TinyGPTV("tinygptv-tiny", tokenizer=word_tokenizer()).save_pretrained(path)
    return path


def _true_answers(world):
    """The answer a perfect model gives to every question of the test and compositional splits."""
    answers = {}
    refs = pickle.loads((world / "refer" / "refs(shapes).p").read_bytes())
    boxes = {a["id"]: a["bbox"] for a in json.loads((world / "refer" / "instances.json").read_text())["annotations"]}
    for split in ("test", "compositional"):
        for ann in json.loads((world / "vqa" / f"{split}_annotations.json").read_text())["annotations"]:
            answers[f"{split}/vqa/{ann['question_id']}"] = ann["multiple_choice_answer"]
        for ref in refs:
            if ref["split"] == split:
                sentence = ref["sentences"][0]
                answers[f"{split}/refer/{sentence['sent_id']}"] = format_box(
                    normalize_box(boxes[ref["ann_id"]], 224, 224, "xywh")
                )
                answers[f"{split}/identify/{sentence['sent_id']}"] = sentence["sent"]
        captions = json.loads((world / "captions" / f"captions_{split}.json").read_text())["annotations"]
        for caption in captions[::-1]:  # the first caption of each image wins
            answers[f"{split}/caption/{caption['image_id']}"] = caption["caption"]
        for scene in load_scenes(world, split):
            grounded = [format_grounded(o.describe(), normalize_box(o.box, 224, 224)) for o in scene.objects]
            answers[f"{split}/grounding/{scene.image_id}"] = " and ".join(grounded) + " ."
    return answers


def test_true_answers_score_100_on_every_task_and_split(world, tmp_path):
    answers = _true_answers(world)
    (tmp_path / "truth.jsonl").write_text(
        "".join(json.dumps({"question_id": k, "answer": v}) + "\n" for k, v in answers.items())
    )
    assert (
        main(
            [
                "eval",
                "shapes",
                "--data",
                str(world),
                "--predictions",
                str(tmp_path / "truth.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["n"] == len(answers) and result["missing"] == 0
    for split in ("test", "compositional"):
        for task in SHAPES_TASKS:
            assert result["metrics"][f"n_{split}/{task}"] > 0
            assert result["metrics"][f"accuracy_{split}/{task}"] == 100.0, (split, task)
    # and a wrong answer everywhere scores 0 on every task
    (tmp_path / "wrong.jsonl").write_text(
        "".join(json.dumps({"question_id": k, "answer": "purple"}) + "\n" for k in answers)
    )
    main(
        [
            "eval",
            "shapes",
            "--data",
            str(world),
            "--predictions",
            str(tmp_path / "wrong.jsonl"),
            "--out",
            str(tmp_path / "w"),
        ]
    )
    assert json.loads((tmp_path / "w" / "result.json").read_text())["metrics"]["accuracy"] == 0.0


def test_shapes_prompts_are_the_readers_first_phrasings(world):
    bench = get_benchmark("shapes", image_size=28)
    items = {}
    for item in bench.load(world, "test"):
        items.setdefault(item.group, item)  # the first question of each task
    assert items["test/vqa"].text == "How many objects are there?"
    assert items["test/refer"].text.startswith("Where is the ") and items["test/refer"].task == "refer"
    assert items["test/identify"].text.startswith("What is in the region {<")
    assert items["test/caption"].text == "Briefly describe this image."
    assert items["test/grounding"].max_new_tokens == 160
    assert items["test/vqa"].image.parent.name == "224"  # no 28-px images: the canonical ones


def test_eval_shapes_command_prints_the_table_and_matches_the_python_api(world, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "shapes",
            "--data",
            str(world),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--limit",
            "1",
            "--tasks",
            "vqa",
            "refer",
            "identify",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| task | test | compositional |" in printed
    for task in ("vqa", "refer", "identify"):
        assert f"| {task} | " in printed
    result = json.loads((out / "result.json").read_text())
    assert result["n"] == 6 and result["protocol"]["settings"]["iou_threshold"] == 0.5
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["group"] for line in lines] == [
        "test/vqa",
        "test/refer",
        "test/identify",
        "compositional/vqa",
        "compositional/refer",
        "compositional/identify",
    ]

    model = TinyGPTV.from_pretrained(model_dir)
    model.train()
    summary = evaluate_shapes(model, world, tasks=("vqa", "refer", "identify"), limit=1, batch_size=4)
    assert model.training  # the caller's mode is restored
    for split in ("test", "compositional"):
        for task in ("vqa", "refer", "identify"):
            assert summary["accuracy"][split][task] == result["metrics"][f"accuracy_{split}/{task}"]
            assert summary["n"][split][task] == 1
    table = format_shapes_table(summary)
    assert table.splitlines()[0] == "| task | test | compositional |" and len(table.splitlines()) == 5

    # with return_predictions: the same answers as predictions.jsonl, keyed by question id
    again = evaluate_shapes(model, world, tasks=("vqa", "refer", "identify"), limit=1, return_predictions=True)
    assert again["predictions"] == {line["question_id"]: line["answer"] for line in lines}


def test_agreement_benchmark_pools_the_tasks_into_an_all_row(world, model_dir, capsys):
    # benchmarks/bench_quantize_agreement.py end to end on a tiny model: per task rows, then one row
    # over every question of the split whose share is the tasks' shares weighted by their counts
    from conftest import load_benchmark

    bench = load_benchmark("bench_quantize_agreement")
    args = ["--data", str(world), "--model", str(model_dir), "--limit", "3", "--threads", "1", "--modes", "fp32", "int8"]
    assert bench.main([*args, "--tasks", "vqa", "refer", "identify"]) == 0
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| int8 |")]
    cells = {row[1].strip(): [c.strip() for c in row[2:]] for row in rows}
    assert set(cells) == {"vqa", "refer", "identify", "all"}
    counts = {task: int(cells[task][0]) for task in ("vqa", "refer", "identify")}
    assert int(cells["all"][0]) == sum(counts.values()) > 0
    pooled = sum(float(cells[task][1]) * n for task, n in counts.items()) / sum(counts.values())
    assert float(cells["all"][1]) == pytest.approx(pooled, abs=0.1)
    # the same model against itself agrees everywhere, on the pooled row too
    assert bench.main([*args[:-1], "--tasks", "vqa", "identify"]) == 0
    pooled_rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fp32 | all |")]
    assert len(pooled_rows) == 1 and "| 100.0 | 100.0 (*) |" in pooled_rows[0]  # one run per mode


def test_activation_range_probe_reports_every_linear_of_the_language_model(world, model_dir, capsys):
    from conftest import load_benchmark

    probe = load_benchmark("probe_activation_ranges")
    assert probe.main(["--data", str(world), "--model", str(model_dir), "--limit", "2", "--tasks", "vqa", "refer"]) == 0
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| lm_head") or line.startswith("| model.")]
    lm = TinyGPTV.from_pretrained(model_dir).lm
    linears = {name for name, module in lm.named_modules() if isinstance(module, torch.nn.Linear)}
    assert {row[0].strip() for row in rows} == linears
    for row in rows:
        ratio, largest, per_token = float(row[1]), [float(v) for v in row[2].split(",")], float(row[3])
        assert ratio >= 1.0 and per_token >= 1.0 and largest == sorted(largest, reverse=True)
