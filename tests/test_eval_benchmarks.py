"""`tinygptv eval` end to end on each benchmark: small files in the official layout, written here, run
through the whole command with a real (random, tiny) TinyGPT-V; then prompts, output schema,
resuming and scoring of predictions files."""

import json
import pickle

import pytest
import torch
from PIL import Image

from tinygptv.cli import main
from tinygptv.data.templates import get_template
from tinygptv.eval import get_benchmark
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.testing import word_tokenizer

COLOURS = [(250, 0, 0), (0, 200, 0), (0, 0, 250), (240, 240, 0)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-model") / "tiny"
    torch.manual_seed(0)
    TinyGPTV("tinygptv-tiny", tokenizer=word_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return TinyGPTV.from_pretrained(model_dir).eval()


def _image(path, k=0, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[k % len(COLOURS)]).save(path)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _eval(benchmark, data, model_dir, out, *extra):
    code = main(
        [
            "eval",
            benchmark,
            "--data",
            str(data),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--no-progress",
            *extra,
        ]
    )
    assert code == 0
    return _read_outputs(out)


def _read_outputs(out):
    result = json.loads((out / "result.json").read_text())
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return result, lines


def _check_schema(result, lines, benchmark, n):
    assert result["benchmark"] == benchmark and result["n"] == n and result["missing"] == 0
    assert isinstance(result["model"], str) and "accuracy" in result["metrics"]
    protocol = result["protocol"]
    assert protocol["decoding"] == "greedy" and protocol["template"] == "stage4"
    assert protocol["image_size"] == 28  # the tiny model's resolution, recorded
    assert len(lines) == n
    for line in lines:
        assert {"question_id", "answer", "score"} <= set(line)
        assert isinstance(line["answer"], str)
        assert line["score"] is not None


def _rendered(item, protocol):
    return get_template(protocol.template).prompt(item.text, 1, item.task)


# --- the VQA-accuracy family ------------------------------------------------------------------------


def _vqa_files(root, questions_file, annotations_file, answers):
    qs = [
        {"question_id": 100 + k, "image_id": k + 1, "question": f"What color is thing {k}?"}
        for k in range(len(answers))
    ]
    anns = [
        {
            "question_id": 100 + k,
            "image_id": k + 1,
            "answer_type": "other",
            "question_type": "what color",
            "multiple_choice_answer": a[0],
            "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(a)],
        }
        for k, a in enumerate(answers)
    ]
    _write(root / questions_file, {"questions": qs, "task_type": "Open-Ended", "data_subtype": "val2014"})
    _write(root / annotations_file, {"annotations": anns})
    for k in range(len(answers)):
        _image(root / "val2014" / f"COCO_val2014_{k + 1:012d}.jpg", k)


@pytest.mark.parametrize(
    "benchmark, questions_file, annotations_file",
    [
        ("okvqa", "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json"),
        ("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
    ],
)
def test_coco_vqa_benchmarks(tmp_path, model_dir, benchmark, questions_file, annotations_file):
    answers = [["red"] * 10, ["blue"] * 3 + ["green"] * 7, ["2"] * 10]
    _vqa_files(tmp_path / "data", questions_file, annotations_file, answers)
    bench = get_benchmark(benchmark)
    items = bench.load(tmp_path / "data", "val")
    assert _rendered(items[0], bench.protocol) == (
        "[INST] <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short answer: "
        "What color is thing 0? [/INST]"
    )
    assert items[1].image.name == "COCO_val2014_000000000002.jpg"
    result, lines = _eval(benchmark, tmp_path / "data", model_dir, tmp_path / "out")
    _check_schema(result, lines, benchmark, 3)
    assert [line["question_id"] for line in lines] == [100, 101, 102]
    # the same files scored from a predictions file of known answers: 1, 0.9 and "Two." -> 1
    _write(
        tmp_path / "mine.json",
        [
            {"question_id": 100, "answer": "Red"},
            {"question_id": 101, "answer": "blue"},
            {"question_id": 102, "answer": "Two."},
        ],
    )
    assert (
        main(
            [
                "eval",
                benchmark,
                "--data",
                str(tmp_path / "data"),
                "--predictions",
                str(tmp_path / "mine.json"),
                "--out",
                str(tmp_path / "scored"),
            ]
        )
        == 0
    )
    result, lines = _read_outputs(tmp_path / "scored")
    assert result["metrics"]["accuracy"] == pytest.approx(100 * (1 + 0.9 + 1) / 3, abs=0.01)
    assert [line["score"] for line in lines] == pytest.approx([1.0, 0.9, 1.0])
    assert result["model"] == "predictions:mine.json"


def test_vizwiz_keeps_unanswerable_and_takes_official_result_files(tmp_path, model_dir):
    data = tmp_path / "vizwiz"
    records = [
        {
            "image": "VizWiz_val_00000000.jpg",
            "question": "What is this?",
            "answerable": 1,
            "answer_type": "other",
            "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10,
        },
        {
            "image": "VizWiz_val_00000001.jpg",
            "question": "What colour is the shirt?",
            "answerable": 0,
            "answer_type": "unanswerable",
            "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
        },
    ]
    _write(data / "Annotations" / "val.json", records)
    for k, r in enumerate(records):
        _image(data / "val" / r["image"], k)
    bench = get_benchmark("vizwiz")
    item = bench.load(data, "val")[0]
    assert item.question_id == "VizWiz_val_00000000.jpg"
    assert item.text == (
        "The question is 'What is this?' Based on the image, answer the question with a single word or phrase. "
        "and reply 'unanswerable' when the provided information is insufficient"
    )
    result, lines = _eval("vizwiz", data, model_dir, tmp_path / "out")
    _check_schema(result, lines, "vizwiz", 2)
    assert {"accuracy_other", "accuracy_unanswerable"} <= set(result["metrics"])
    # VizWiz's official result format names questions by "image"; an empty answer earns nothing
    (tmp_path / "res.json").write_text(
        json.dumps(
            [
                {"image": "VizWiz_val_00000000.jpg", "answer": ""},
                {"image": "VizWiz_val_00000001.jpg", "answer": "Unanswerable."},
            ]
        )
    )
    assert (
        main(
            [
                "eval",
                "vizwiz",
                "--data",
                str(data),
                "--predictions",
                str(tmp_path / "res.json"),
                "--out",
                str(tmp_path / "scored"),
            ]
        )
        == 0
    )
    result, _ = _read_outputs(tmp_path / "scored")
    assert result["metrics"]["accuracy"] == 50.0
    assert result["metrics"]["accuracy_unanswerable"] == 100.0


# --- exact match: GQA, VSR -----------------------------------------------------------------------------


def test_gqa_exact_match_lenient_and_report(tmp_path, model_dir, capsys):
    data = tmp_path / "gqa"
    questions = {
        "201": {"imageId": "n1", "question": "Is the cat red?", "answer": "yes", "fullAnswer": "Yes, it is."},
        "202": {"imageId": "n2", "question": "What is on the table?", "answer": "cup", "fullAnswer": "A cup."},
    }
    _write(data / "questions1.2" / "testdev_balanced_questions.json", questions)
    _image(data / "images" / "n1.jpg", 0)
    _image(data / "images" / "n2.jpg", 1)
    result, lines = _eval("gqa", data, model_dir, tmp_path / "out")
    _check_schema(result, lines, "gqa", 2)
    assert result["split"] == "testdev" and "accuracy_lenient" in result["metrics"]
    assert {line["question_id"] for line in lines} == {"201", "202"}
    (tmp_path / "p.jsonl").write_text(
        '{"question_id": "201", "answer": "yes, it is"}\n{"question_id": "202", "answer": "A cup."}\n'
    )
    main(["eval", "gqa", "--data", str(data), "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s")])
    result, _ = _read_outputs(tmp_path / "s")
    assert result["metrics"]["accuracy"] == 50.0  # "yes, it is" is not an exact "yes"
    assert result["metrics"]["accuracy_lenient"] == 100.0  # but holds it, the original's rule
    # the report puts both beside the paper, whose number came from the lenient rule
    capsys.readouterr()
    assert main(["eval-report", str(tmp_path / "s"), str(tmp_path / "out" / "result.json")]) == 0
    table = capsys.readouterr().out
    assert "| GQA testdev balanced | substring (the paper's rule) | 38.9 | 100.0 |" in table
    assert "| GQA testdev balanced | exact match | - | 50.0 |" in table
    assert "| VSR zero-shot test | exact match | - | - |" in table


def test_vsr_zero_shot_test(tmp_path, model_dir):
    data = tmp_path / "vsr"
    lines = [
        {"image": "000000017697.jpg", "caption": "The car is behind the suitcase.", "label": 1, "relation": "behind"},
        {"image": "000000199940.jpg", "caption": "The cat is under the backpack.", "label": 0, "relation": "under"},
    ]
    (data / "splits" / "zeroshot").mkdir(parents=True)
    (data / "splits" / "zeroshot" / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for k, x in enumerate(lines):
        _image(data / "images" / x["image"], k)
    bench = get_benchmark("vsr")
    items = bench.load(data, "test")
    assert items[0].text == "Based on the image, is this statement true or false? The car is behind the suitcase."
    assert items[1].target == ["false", "no"]
    result, out_lines = _eval("vsr", data, model_dir, tmp_path / "out")
    _check_schema(result, out_lines, "vsr", 2)
    assert [line["question_id"] for line in out_lines] == [0, 1]
    (tmp_path / "p.json").write_text(
        json.dumps([{"question_id": 0, "answer": "Yes."}, {"question_id": 1, "answer": "true"}])
    )
    main(["eval", "vsr", "--data", str(data), "--predictions", str(tmp_path / "p.json"), "--out", str(tmp_path / "s")])
    result, _ = _read_outputs(tmp_path / "s")
    assert result["metrics"]["accuracy"] == 50.0


# --- choices: IconQA, Hateful Memes ----------------------------------------------------------------------


def test_iconqa_ranks_the_choices_by_their_loss(tmp_path, model_dir, model):
    data = tmp_path / "iconqa_data"
    problems = {
        "11": {
            "question": "How many dogs are there?",
            "choices": ["2", "3", "4"],
            "answer": 1,
            "ques_type": "choose_txt",
        },
        "12": {
            "question": "What color is the sky?",
            "choices": ["blue", "red"],
            "answer": 0,
            "ques_type": "choose_txt",
        },
    }
    _write(data / "problems.json", problems)
    _write(data / "pid_splits.json", {"choose_txt_val": ["11", "12"], "choose_txt_test": []})
    for k, pid in enumerate(problems):
        _image(data / "iconqa" / "val" / "choose_txt" / pid / "image.png", k)
    result, lines = _eval("iconqa", data, model_dir, tmp_path / "out")
    _check_schema(result, lines, "iconqa", 2)
    assert "multi_select" in result["protocol"]["settings"]["selection"]
    bench = get_benchmark("iconqa")
    items = bench.load(data, "val")
    assert _rendered(items[0], bench.protocol) == (
        "[INST] <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short answer: "
        "How many dogs are there? [/INST]"
    )
    assert items[0].meta["choices"] == ["2", "3", "4"] and items[0].target == 1
    template = get_template("stage4")
    for item, line in zip(items, lines):
        assert line["answer"] in item.meta["choices"] and len(line["losses"]) == len(item.meta["choices"])
        # each option's loss equals a plain forward pass of that prompt + option alone
        pixels = model._pixels(Image.open(item.image))
        for choice, loss in zip(item.meta["choices"], line["losses"]):
            batch = model.prepare([template.prompt(item.text, 1, "vqa")], [pixels], [choice + "###"])
            with torch.no_grad():
                expected = model(**batch).per_sample_loss[0].item()
            assert loss == pytest.approx(expected, abs=2e-4)
        assert line["answer"] == item.meta["choices"][min(range(len(line["losses"])), key=line["losses"].__getitem__)]
        assert line["score"] == float(item.meta["choices"].index(line["answer"]) == item.target)


def test_hateful_memes_accuracy_auroc_and_p_yes(tmp_path, model_dir, model):
    data = tmp_path / "hm"
    memes = [
        {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their color"},
        {"id": 23058, "img": "img/23058.png", "label": 1, "text": "don't be afraid"},
        {"id": 13894, "img": "img/13894.png", "label": 1, "text": "putting bows on your pet"},
    ]
    (data / "img").mkdir(parents=True)
    (data / "dev.jsonl").write_text("".join(json.dumps(m) + "\n" for m in memes))
    for k, m in enumerate(memes):
        _image(data / m["img"], k)
    bench = get_benchmark("hm")
    item = bench.load(data, "dev")[0]
    # the authors' prompt, verbatim, without a task identifier (as their HM script sent it)
    assert _rendered(item, bench.protocol) == (
        "[INST] <Img><ImageHere></Img> This is an image writting 'its their character not their color'. "
        "Is this image hateful? Answer yes or no. Answer: [/INST]"
    )
    result, lines = _eval("hm", data, model_dir, tmp_path / "out")
    _check_schema(result, lines, "hm", 3)
    assert result["metrics"]["auroc_score"] == "p_yes" and result["metrics"]["auroc"] is not None
    assert all(0.0 <= line["p_yes"] <= 1.0 for line in lines)
    # p_yes of the padded batch equals the meme alone
    template = get_template("stage4")
    single = model.prepare([template.prompt(item.text, 1, None)], [model._pixels(Image.open(item.image))])
    with torch.no_grad():
        logits = model(**{k: v for k, v in single.items() if k != "labels"}).logits[0, -1]
    tok = model.tokenizer
    yes, no = logits[tok("yes")["input_ids"][0]], logits[tok("no")["input_ids"][0]]
    assert lines[0]["p_yes"] == pytest.approx(torch.sigmoid(yes - no).item(), abs=1e-4)
    # scoring answers: neither yes nor no is wrong; AUROC from the answers when there is no p_yes
    (tmp_path / "p.jsonl").write_text(
        "".join(
            json.dumps(x) + "\n"
            for x in [
                {"question_id": 42953, "answer": "No."},
                {"question_id": 23058, "answer": "yes"},
                {"question_id": 13894, "answer": "maybe"},
            ]
        )
    )
    main(["eval", "hm", "--data", str(data), "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s")])
    result, _ = _read_outputs(tmp_path / "s")
    assert result["metrics"]["accuracy"] == pytest.approx(66.67)
    assert result["metrics"]["auroc_score"] == "yes/no answer"
    assert result["metrics"]["auroc"] == 100.0  # scores 0, 1, 0.5 rank both hateful memes above the other


# --- RefCOCO / + / g ---------------------------------------------------------------------------------------


def _refer_files(root, folder, refs_file, splits):
    refs, images, annotations = [], [], []
    for k, split in enumerate(splits):
        image_id, ann_id = k + 1, 10 + k
        images.append({"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "width": 40, "height": 30})
        annotations.append({"id": ann_id, "image_id": image_id, "bbox": [4, 3, 16, 12], "category_id": 1})
        refs.append(
            {
                "ref_id": k,
                "ann_id": ann_id,
                "image_id": image_id,
                "split": split,
                "category_id": 1,
                "sentences": [{"sent": "the red thing", "sent_id": 100 + k}],
                "sent_ids": [100 + k],
            }
        )
        _image(root / "train2014" / images[-1]["file_name"], k)
    (root / folder).mkdir(parents=True, exist_ok=True)
    with open(root / folder / refs_file, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    _write(root / folder / "instances.json", {"images": images, "annotations": annotations, "categories": []})


@pytest.mark.parametrize(
    "benchmark, refs_file, splits",
    [
        ("refcoco", "refs(unc).p", ["val", "testA", "testB"]),
        ("refcoco+", "refs(unc).p", ["val", "testA", "testB"]),
        ("refcocog", "refs(umd).p", ["val", "test"]),
    ],
)
def test_refcoco_family(tmp_path, model_dir, benchmark, refs_file, splits):
    data = tmp_path / "coco"
    _refer_files(data, benchmark, refs_file, splits + ["train"])
    bench = get_benchmark(benchmark)
    items = bench.load(data, None)
    assert [i.group for i in items] == splits  # every split, its own refs, the train ref left out
    assert (
        _rendered(items[0], bench.protocol)
        == "[INST] <Img><ImageHere></Img> [refer] give me the location of the red thing [/INST]"
    )
    assert items[0].target == (4, 3, 20, 15)
    result, lines = _eval(benchmark, data, model_dir, tmp_path / "out")
    _check_schema(result, lines, benchmark, len(splits))
    assert result["protocol"]["settings"]["iou_threshold"] == 0.5
    assert {f"accuracy_{s}" for s in splits} <= set(result["metrics"])
    assert all("iou" in line for line in lines)
    # the true box (10-50 % of 40 px, 10-50 % of 30 px) is right, a shifted one wrong, no box wrong
    answers = ["{<10><10><50><50>}", "{<60><60><90><90>}", "no idea"]
    (tmp_path / "p.json").write_text(
        json.dumps([{"question_id": 100 + k, "answer": answers[k % 3]} for k in range(len(splits))])
    )
    with pytest.warns(UserWarning, match="not in the benchmark"):  # the other splits' answers
        main(
            [
                "eval",
                benchmark,
                "--data",
                str(data),
                "--predictions",
                str(tmp_path / "p.json"),
                "--out",
                str(tmp_path / "s"),
                "--split",
                "val",
            ]
        )
    result, lines = _read_outputs(tmp_path / "s")
    assert result["n"] == 1 and result["metrics"]["accuracy"] == 100.0 and lines[0]["iou"] == 1.0


# --- COCO captions ------------------------------------------------------------------------------------------


def test_coco_caption_karpathy_test(tmp_path, model_dir):
    data = tmp_path / "coco"
    references = [
        ["A red square on a table.", "a red box"],
        ["Two dogs play in the park.", "dogs running"],
        ["a cat", "a small cat"],
    ]
    images = []
    for k in range(3):
        images.append(
            {
                "filepath": "val2014",
                "filename": f"COCO_val2014_{k + 1:012d}.jpg",
                "cocoid": k + 1,
                "split": "test" if k < 2 else "train",
                "sentences": [{"raw": raw, "tokens": []} for raw in references[k]],
            }
        )
        _image(data / "val2014" / images[-1]["filename"], k)
    _write(data / "dataset_coco.json", {"images": images, "dataset": "coco"})
    bench = get_benchmark("coco-caption")
    items = bench.load(data, "test")
    assert [i.question_id for i in items] == [1, 2] and items[1].target == references[1]
    assert (
        _rendered(items[0], bench.protocol)
        == "[INST] <Img><ImageHere></Img> [caption] Briefly describe this image. [/INST]"
    )
    result, lines = _eval("coco-caption", data, model_dir, tmp_path / "out")
    assert result["n"] == 2 and result["primary"] == "CIDEr" and result["metrics"]["accuracy"] is None
    assert {"CIDEr", "BLEU-4", "METEOR", "ROUGE-L"} <= set(result["metrics"])
    assert result["protocol"]["task"] == "caption" and result["protocol"]["max_new_tokens"] == 30
    assert [line["question_id"] for line in lines] == [1, 2] and all("score" in line for line in lines)
    # a caption equal to a reference scores far above one that shares nothing
    (tmp_path / "p.json").write_text(
        json.dumps([{"question_id": 1, "answer": "a red square on a table"}, {"question_id": 2, "answer": "zebra"}])
    )
    main(
        [
            "eval",
            "coco-caption",
            "--data",
            str(data),
            "--predictions",
            str(tmp_path / "p.json"),
            "--out",
            str(tmp_path / "s"),
        ]
    )
    result, lines = _read_outputs(tmp_path / "s")
    assert lines[0]["score"] > 0.5 and lines[1]["score"] == 0.0
    assert result["metrics"]["BLEU-4"] > 0 and result["metrics"]["ROUGE-L"] > 0


# --- runs: resuming, refusing to mix runs, missing predictions --------------------------------------------


def test_runs_resume_append_and_refuse_a_different_protocol(tmp_path, model_dir):
    data = tmp_path / "data"
    _vqa_files(
        data,
        "OpenEnded_mscoco_val2014_questions.json",
        "mscoco_val2014_annotations.json",
        [["red"] * 10, ["blue"] * 10, ["green"] * 10],
    )
    out = tmp_path / "out"
    result, lines = _eval("okvqa", data, model_dir, out, "--limit", "1")
    assert result["n"] == 1 and len(lines) == 1
    # plant a known answer where the first run wrote, and a half-written line as a crash leaves it
    lines[0]["answer"] = "red"
    (out / "predictions.jsonl").write_text(json.dumps(lines[0]) + "\n" + '{"question_id": 101, "ans')
    with pytest.warns(UserWarning, match="truncated"):
        result, lines = _eval("okvqa", data, model_dir, out)
    assert result["n"] == 3 and result["resumed"] == 1
    assert lines[0]["answer"] == "red" and lines[0]["score"] == 1.0  # kept, not generated again
    assert [line["question_id"] for line in lines] == [100, 101, 102]
    # the same folder with another template is another run: refused, nothing mixed
    code = main(
        [
            "eval",
            "okvqa",
            "--data",
            str(data),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--template",
            "stage4-instruct",
            "--no-progress",
        ]
    )
    assert code == 2
    assert _read_outputs(out)[1] == lines
    # missing predictions count as wrong
    (tmp_path / "p.json").write_text(json.dumps([{"question_id": 100, "answer": "red"}]))
    with pytest.warns(UserWarning, match="no prediction"):
        main(
            [
                "eval",
                "okvqa",
                "--data",
                str(data),
                "--predictions",
                str(tmp_path / "p.json"),
                "--out",
                str(tmp_path / "s"),
            ]
        )
    result, _ = _read_outputs(tmp_path / "s")
    assert result["missing"] == 2 and result["metrics"]["accuracy"] == pytest.approx(33.33)


def test_clear_errors_for_missing_files_and_wrong_ids(tmp_path, model_dir, capsys):
    assert main(["eval", "gqa", "--data", str(tmp_path), "--predictions", str(tmp_path / "x.json")]) == 2
    assert "testdev_balanced_questions.json" in capsys.readouterr().err
    _write(tmp_path / "testdev_balanced_questions.json", {"1": {"imageId": "a", "question": "q?", "answer": "no"}})
    _write(tmp_path / "x.json", [{"question_id": "nope", "answer": "no"}])
    assert (
        main(
            [
                "eval",
                "gqa",
                "--data",
                str(tmp_path),
                "--predictions",
                str(tmp_path / "x.json"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "none of the 1 question ids" in capsys.readouterr().err
    assert (
        main(["eval", "gqa", "--data", str(tmp_path), "--split", "train", "--predictions", str(tmp_path / "x.json")])
        == 2
    )
    assert "no split 'train'" in capsys.readouterr().err


def test_the_command_lists_every_benchmark():
    from tinygptv.commands.eval import BENCHMARK_NAMES
    from tinygptv.eval import BENCHMARKS

    assert tuple(BENCHMARKS) == BENCHMARK_NAMES
    for name in BENCHMARKS:
        assert get_benchmark(name).name == name
