"""One test per reader, each on a small fixture written in the dataset's official format."""

import json
import pickle
import random

import pytest
from PIL import Image

from tinygptv.data.boxes import Box, format_box, parse_grounded
from tinygptv.data.instructions import INSTRUCTIONS, clean_caption
from tinygptv.data.readers import (
    AOKVQA,
    GQA,
    OCRVQA,
    OKVQA,
    READERS,
    CCSBUAlign,
    COCOCaptions,
    CustomData,
    Flickr30kEntities,
    LLaVAInstruct,
    MultiTaskConversation,
    RefCOCO,
    TextCaps,
    UnnaturalInstructions,
    VisualGenomeRegions,
    VQAv2,
    WebDatasetPairs,
    build_source,
)
from tinygptv.data.sample import BadSample

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save_image(path, color=RED, size=(40, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def color_of(image):
    return image.getpixel((image.width // 2, image.height // 2))


def close_to(rgb, expected, tol=12):  # JPEG is lossy
    return all(abs(a - b) <= tol for a, b in zip(rgb, expected))


# --------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------


def _jpeg_bytes(color):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    """Two img2dataset-style shards: jpg + txt + json per sample; one caption only in json; one corrupt image."""
    import webdataset as wds

    paths = []
    for shard in range(2):
        path = tmp_path / f"pairs-{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for k in range(5):
                key = f"{shard}{k:04d}"
                sample = {"__key__": key, "jpg": _jpeg_bytes((k * 50, shard * 200, 0))}
                if k == 1:
                    sample["json"] = {"caption": f"JSON caption {key}!", "status": "success"}
                else:
                    sample["txt"] = f"A Photo: number {key}."
                    sample["json"] = {"caption": "unused", "status": "success"}
                if shard == 1 and k == 3:
                    sample["jpg"] = b"not an image"
                sink.write(sample)
        paths.append(path)
    return tmp_path, paths


def test_webdataset_pairs_reads_img2dataset_shards(shards):
    root, paths = shards
    source = WebDatasetPairs(str(root / "pairs-{00000..00001}.tar"))
    assert source.urls == [str(p) for p in paths]
    samples = list(source.samples())
    assert len(samples) == 9  # the corrupt image is skipped
    first = samples[0]
    assert first.task == "caption" and first.source == "pairs" and first.id == "00000"
    assert first.turns[0].assistant == "a photo number 00000"  # BLIP caption cleaning
    assert first.turns[0].user == INSTRUCTIONS["caption"][0]
    assert first.images[0].size == (16, 16)
    assert samples[1].turns[0].assistant == "json caption 00001"  # caption from .json
    assert close_to(color_of(samples[2].images[0]), (100, 0, 0))
    # a folder works as well as a brace pattern
    assert WebDatasetPairs(root).urls == [str(p) for p in paths]
    with pytest.raises(FileNotFoundError):
        WebDatasetPairs(root / "nothing-here")


def test_webdataset_stream_is_seeded_resumable_and_skips_ahead(shards):
    root, paths = shards
    keys = {}
    for seed in (0, 1):
        source = WebDatasetPairs(paths, shuffle_buffer=4)
        stream = []
        for position in range(25):  # 2.5 epochs of 10 samples
            try:
                stream.append(source.load(position, seed).id)
            except BadSample as err:
                assert "corrupt image" in str(err)
                stream.append("bad")
        keys[seed] = stream
        # every epoch is a permutation of the 10 samples
        assert sorted(stream[:10]) == sorted(stream[10:20])
        assert stream.count("bad") == 2 + (1 if "bad" in stream[20:] else 0)
    assert keys[0] != keys[1]
    # a fresh reader asked for one position (ahead, across an epoch boundary) agrees with the stream
    for position in (13, 7, 21):
        fresh = WebDatasetPairs(paths, shuffle_buffer=4)
        expected = keys[0][position]
        if expected == "bad":
            with pytest.raises(BadSample):
                fresh.load(position, 0)
        else:
            assert fresh.load(position, 0).id == expected
    # a copy sent to a worker process leaves its open shard behind, and reads on from where it is asked
    source = WebDatasetPairs(paths, shuffle_buffer=4)
    first = source.load(0, 0).id
    clone = pickle.loads(pickle.dumps(source))
    assert clone._cursor is None and first == keys[0][0]
    assert clone.load(1, 0).id == source.load(1, 0).id == keys[0][1]
    # going back restarts the reader
    source = WebDatasetPairs(paths, shuffle_buffer=4)
    ids = [keys[0][p] for p in (12, 3)]
    got = []
    for p in (12, 3):
        try:
            got.append(source.load(p, 0).id)
        except BadSample:
            got.append("bad")
    assert got == ids


def test_cc_sbu_align(tmp_path):
    save_image(tmp_path / "image" / "2.jpg", GREEN)
    save_image(tmp_path / "image" / "7.jpg", BLUE)
    write_json(
        tmp_path / "filter_cap.json",
        {
            "annotations": [
                {"image_id": "2", "caption": "A green field. It is wide."},
                {"image_id": "7", "caption": "  "},
                {"image_id": "9", "caption": "gone"},
            ]
        },
    )
    source = CCSBUAlign(tmp_path)
    sample = source[0]
    assert sample.task == "detail" and sample.source == "cc_sbu_align"
    assert sample.turns[0].assistant == "A green field. It is wide."  # descriptions keep their case
    assert sample.turns[0].user in INSTRUCTIONS["detail"]
    assert close_to(color_of(sample.images[0]), GREEN)
    with pytest.raises(BadSample, match="empty"):
        source[1]
    with pytest.raises(BadSample, match="missing image"):
        source[2]
    rng = random.Random(0)
    assert source.get(0, rng).turns[0].user in INSTRUCTIONS["detail"]


def test_coco_captions_official_and_karpathy(tmp_path):
    save_image(tmp_path / "train2014" / "COCO_train2014_000000000042.jpg", RED)
    write_json(
        tmp_path / "captions_train2014.json",
        {
            "images": [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "width": 40, "height": 30}],
            "annotations": [
                {"id": 1, "image_id": 42, "caption": "A red wall."},
                {"id": 2, "image_id": 42, "caption": "Something RED!"},
                {"id": 3, "image_id": 99, "caption": "no such image"},
            ],
        },
    )
    source = COCOCaptions(tmp_path / "captions_train2014.json", tmp_path / "train2014")
    assert len(source) == 3
    assert [source[i].turns[0].assistant for i in range(2)] == ["a red wall", "something red"]
    assert source[0].task == "caption"
    with pytest.raises(BadSample, match="no known image"):
        source[2]
    # LAVIS / MiniGPT-v2 Karpathy list
    write_json(
        tmp_path / "karpathy.json",
        [{"image": "COCO_train2014_000000000042.jpg", "caption": ["One.", "Two."], "image_id": "coco_42"}],
    )
    karpathy = COCOCaptions(tmp_path / "karpathy.json", tmp_path / "train2014")
    assert [s.turns[0].assistant for s in karpathy.samples()] == ["one", "two"]


def test_textcaps(tmp_path):
    save_image(tmp_path / "train_images" / "abc123.jpg", BLUE)
    write_json(
        tmp_path / "TextCaps_0.1_train.json",
        {
            "dataset_type": "train",
            "data": [
                {
                    "image_id": "abc123",
                    "image_path": "train/abc123.jpg",
                    "caption_str": "A sign that says STOP.",
                    "caption_id": 0,
                }
            ],
        },
    )
    sample = TextCaps(tmp_path / "TextCaps_0.1_train.json", tmp_path / "train_images")[0]
    assert sample.turns[0].assistant == "a sign that says stop" and sample.task == "caption"


# --------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------


def _refcoco_fixture(tmp_path):
    root = tmp_path / "refcoco"
    root.mkdir()
    refs = [
        {
            "ref_id": 0,
            "ann_id": 10,
            "image_id": 1,
            "split": "train",
            "category_id": 1,
            "file_name": "COCO_train2014_000000000001_10.jpg",
            "sentences": [
                {"sent": "man on left", "raw": "Man on left.", "tokens": ["man", "on", "left"], "sent_id": 0},
                {"sent": "left guy", "raw": "left guy", "tokens": ["left", "guy"], "sent_id": 1},
            ],
        },
        {
            "ref_id": 1,
            "ann_id": 11,
            "image_id": 1,
            "split": "testA",
            "category_id": 1,
            "file_name": "COCO_train2014_000000000001_11.jpg",
            "sentences": [{"sent": "right guy", "sent_id": 2}],
        },
        {
            "ref_id": 2,
            "ann_id": 99,
            "image_id": 1,
            "split": "train",
            "category_id": 1,
            "file_name": "x.jpg",
            "sentences": [{"sent": "ghost", "sent_id": 3}],
        },
    ]
    with (root / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    write_json(
        root / "instances.json",
        {
            "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 200, "height": 100}],
            "annotations": [
                {"id": 10, "image_id": 1, "bbox": [10, 20, 30, 40], "category_id": 1},
                {"id": 11, "image_id": 1, "bbox": [150, 0, 50, 100], "category_id": 1},
            ],
            "categories": [{"id": 1, "name": "person"}],
        },
    )
    save_image(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg", RED, size=(200, 100))
    return root


def test_refcoco_refer_and_identify(tmp_path):
    root = _refcoco_fixture(tmp_path)
    refer = RefCOCO(root, tmp_path / "train2014", split="train")
    assert refer.name == "refcoco" and len(refer) == 3  # two sentences + one ref without annotation
    sample = refer[0]
    box = Box(5, 20, 20, 60)  # [10, 20, 30, 40] xywh in 200 x 100
    assert sample.task == "refer" and sample.geometry
    assert sample.turns[0].user == INSTRUCTIONS["refer"][0].format("man on left")
    assert sample.turns[0].assistant == format_box(box) == "{<5><20><20><60>}"
    assert sample.meta["boxes"] == [box]
    assert refer[1].meta["phrase"] == "left guy"
    with pytest.raises(BadSample, match="no annotation"):
        refer[2]
    identify = RefCOCO(root, tmp_path / "train2014", split="train", inverse=True)
    assert identify.name == "refcoco_inverse"
    inverse = identify[0]
    assert inverse.task == "identify"
    assert inverse.turns[0].user == INSTRUCTIONS["identify"][0].format("{<5><20><20><60>}")
    assert inverse.turns[0].assistant == "man on left"
    test_a = RefCOCO(root, tmp_path / "train2014", split="testA")
    assert len(test_a) == 1 and test_a[0].turns[0].assistant == "{<75><0><100><100>}"


def test_refs_pickle_with_classes_is_refused(tmp_path):
    import collections

    root = tmp_path / "refcoco"
    root.mkdir()
    with (root / "refs(unc).p").open("wb") as f:
        pickle.dump([collections.OrderedDict(split="train")], f, protocol=2)
    write_json(root / "instances.json", {"images": [], "annotations": []})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        RefCOCO(root, tmp_path)


def test_visual_genome_regions(tmp_path):
    save_image(tmp_path / "VG_100K" / "1.jpg", GREEN, size=(100, 50))
    save_image(tmp_path / "VG_100K_2" / "2.jpg", BLUE, size=(100, 100))
    write_json(
        tmp_path / "region_descriptions.json",
        [
            {
                "id": 1,
                "regions": [
                    {
                        "region_id": 5,
                        "image_id": 1,
                        "phrase": "a green tree.",
                        "x": 10,
                        "y": 5,
                        "width": 20,
                        "height": 10,
                    },
                    {"region_id": 6, "image_id": 1, "phrase": "tiny", "x": 0, "y": 0, "width": 0, "height": 3},
                ],
            },
            {
                "id": 2,
                "regions": [
                    {"region_id": 7, "image_id": 2, "phrase": "sky", "x": 0, "y": 0, "width": 100, "height": 40}
                ],
            },
        ],
    )
    source = VisualGenomeRegions(tmp_path / "region_descriptions.json", tmp_path)
    assert len(source) == 2  # the zero-width region is dropped
    first = source[0]
    assert first.task == "refer" and first.turns[0].assistant == "{<10><10><30><30>}"
    assert first.meta["phrase"] == "a green tree"
    assert source[1].turns[0].assistant == "{<0><0><100><40>}"  # found in VG_100K_2
    # sizes from image_data.json take precedence over the file
    write_json(tmp_path / "image_data.json", [{"image_id": 1, "width": 200, "height": 100}])
    sized = VisualGenomeRegions(
        tmp_path / "region_descriptions.json", tmp_path, image_data_file=tmp_path / "image_data.json", inverse=True
    )
    assert sized[0].task == "identify" and sized[0].turns[0].assistant == "a green tree"
    assert "{<5><5><15><15>}" in sized[0].turns[0].user


def _flickr_fixture(tmp_path):
    root = tmp_path / "flickr"
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "100.txt").write_text(
        "[/EN#1/people A man] with [/EN#2/clothing a red hat] sits on [/EN#3/scene the grass] .\n"
        "[/EN#4/people/other Two dogs] run .\n"
    )
    (root / "Annotations" / "100.xml").write_text(
        "<annotation><filename>100.jpg</filename><size><width>200</width><height>100</height><depth>3</depth></size>"
        "<object><name>1</name><bndbox><xmin>20</xmin><ymin>10</ymin><xmax>60</xmax><ymax>90</ymax></bndbox></object>"
        "<object><name>2</name><bndbox><xmin>30</xmin><ymin>10</ymin><xmax>50</xmax><ymax>20</ymax></bndbox></object>"
        "<object><name>3</name><scene>1</scene></object>"
        "<object><name>4</name><bndbox><xmin>100</xmin><ymin>50</ymin><xmax>140</xmax><ymax>100</ymax></bndbox></object>"
        "<object><name>4</name><bndbox><xmin>150</xmin><ymin>50</ymin><xmax>200</xmax><ymax>100</ymax></bndbox></object>"
        "</annotation>"
    )
    (root / "train.txt").write_text("100\n101\n")  # 101 has no files
    save_image(root / "flickr30k-images" / "100.jpg", RED, size=(200, 100))
    return root


def test_flickr30k_entities_three_tasks(tmp_path):
    root = _flickr_fixture(tmp_path)
    grounding = Flickr30kEntities(root, split="train", task="grounding")
    assert grounding.name == "flickr30k_grounding" and len(grounding) == 3
    caption = grounding[0].turns[0].assistant
    assert caption == ("<p>A man</p> {<10><10><30><90>} with <p>a red hat</p> {<15><10><25><20>} sits on the grass.")
    assert parse_grounded(caption) == [("A man", [Box(10, 10, 30, 90)]), ("a red hat", [Box(15, 10, 25, 20)])]
    assert grounding[0].task == "grounding" and grounding[0].geometry
    two_dogs = grounding[1].turns[0].assistant
    assert two_dogs == "<p>Two dogs</p> {<50><50><70><100><delim><75><50><100><100>} run."
    with pytest.raises(BadSample, match="missing Sentences"):
        grounding[2]
    refer = Flickr30kEntities(root, split="train", task="refer")
    assert [s.meta["phrase"] for s in refer.samples()] == ["A man", "a red hat", "Two dogs"]  # scene has no box
    assert refer[2].turns[0].assistant == "{<50><50><70><100><delim><75><50><100><100>}"
    identify = Flickr30kEntities(root, split="train", task="identify")
    assert identify[1].turns[0].assistant == "a red hat" and identify[1].task == "identify"
    with pytest.raises(ValueError):
        Flickr30kEntities(root, task="detection")


# --------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------


def _vqa_answers(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def test_vqav2(tmp_path):
    save_image(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg", BLUE)
    write_json(
        tmp_path / "q.json",
        {
            "questions": [
                {"image_id": 5, "question": "What color is it?", "question_id": 50},
                {"image_id": 5, "question": "Is it big?", "question_id": 51},
                {"image_id": 6, "question": "Where?", "question_id": 60},
            ]
        },
    )
    write_json(
        tmp_path / "a.json",
        {
            "annotations": [
                {
                    "question_id": 50,
                    "image_id": 5,
                    "multiple_choice_answer": "blue",
                    "answers": _vqa_answers("blue", "navy", "blue"),
                },
                {"question_id": 51, "image_id": 5, "answers": _vqa_answers("no", "yes", "yes")},
            ]
        },
    )
    source = VQAv2(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "train2014")
    first = source[0]
    assert first.task == "vqa" and first.turns[0].assistant == "blue"
    assert first.turns[0].user == "What color is it?"  # first phrasing is the bare question
    assert first.meta["answers"] == ["blue", "navy", "blue"]
    assert source[1].turns[0].assistant == "yes"  # majority without multiple_choice_answer
    with pytest.raises(BadSample, match="no annotation"):
        source[2]
    # test splits: questions only
    unanswered = VQAv2(tmp_path / "q.json", None, tmp_path / "train2014")
    assert unanswered[0].turns[0].assistant == ""


def test_okvqa_uses_majority(tmp_path):
    save_image(tmp_path / "img" / "COCO_val2014_000000000003.jpg")
    write_json(tmp_path / "q.json", {"questions": [{"image_id": 3, "question": "What sport?", "question_id": 30}]})
    write_json(
        tmp_path / "a.json",
        {"annotations": [{"question_id": 30, "answers": _vqa_answers("tennis", "golf", "tennis ")}]},
    )
    source = OKVQA(
        tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img", image_pattern="COCO_val2014_{image_id:012d}.jpg"
    )
    assert source.name == "okvqa" and source[0].turns[0].assistant == "tennis"


def test_aokvqa(tmp_path):
    save_image(tmp_path / "train2017" / "000000000012.jpg")
    write_json(
        tmp_path / "aokvqa_v1p0_train.json",
        [
            {
                "split": "train",
                "image_id": 12,
                "question_id": "q1",
                "question": "Why is it red?",
                "choices": ["paint", "light", "fire", "wine"],
                "correct_choice_idx": 0,
                "direct_answers": ["paint", "paint", "dye", "paint"],
                "difficult_direct_answer": False,
                "rationales": ["..."],
            },
            {
                "split": "train",
                "image_id": 12,
                "question_id": "q2",
                "question": "What is it?",
                "choices": ["a", "b"],
                "correct_choice_idx": 1,
                "direct_answers": [],
            },
            {
                "split": "train",
                "image_id": 12,
                "question_id": "q3",
                "choices": ["a"],
                "correct_choice_idx": 0,
                "direct_answers": ["x"],
            },
        ],
    )
    source = AOKVQA(tmp_path / "aokvqa_v1p0_train.json", tmp_path / "train2017")
    assert source[0].turns[0].assistant == "paint" and source[0].meta["choices"][1] == "light"
    assert source[1].turns[0].assistant == "b"  # no direct answers: the correct choice
    with pytest.raises(BadSample, match="malformed"):
        source[2]  # no question


def test_gqa(tmp_path):
    save_image(tmp_path / "images" / "2375429.jpg", GREEN)
    write_json(
        tmp_path / "train_balanced_questions.json",
        {
            "07333408": {
                "imageId": "2375429",
                "question": "What is on the table?",
                "answer": "cup",
                "fullAnswer": "The cup is on the table.",
                "types": {},
            }
        },
    )
    sample = GQA(tmp_path / "train_balanced_questions.json", tmp_path / "images")[0]
    assert sample.turns[0].assistant == "cup" and sample.id == "07333408" and sample.task == "vqa"


def test_ocrvqa(tmp_path):
    save_image(tmp_path / "images" / "111.jpg")
    save_image(tmp_path / "images" / "222.png", fmt="PNG")
    write_json(
        tmp_path / "dataset.json",
        {
            "111": {
                "imageURL": "http://x/111.jpg",
                "questions": ["Who wrote this book?", "Is this a comic?"],
                "answers": ["Jane Doe", "No"],
                "split": 1,
                "title": "T",
            },
            "222": {
                "imageURL": "http://x/222.png",
                "questions": ["What is the title?"],
                "answers": ["Red"],
                "split": 1,
            },
            "333": {"imageURL": "http://x/333.jpg", "questions": ["Q?"], "answers": ["A"], "split": 3},
            "444": {"imageURL": "http://x/444.jpg", "questions": ["Q?", "R?"], "answers": ["A"], "split": 1},
        },
    )
    train = OCRVQA(tmp_path / "dataset.json", tmp_path / "images")
    answers = [s.turns[0].assistant for s in train.samples()]
    assert answers == ["Jane Doe", "No", "Red"]  # 444 (mismatched lists) is skipped
    with pytest.raises(BadSample, match="differ in number"):
        train[3]
    assert len(OCRVQA(tmp_path / "dataset.json", tmp_path / "images", split="test")) == 1


# --------------------------------------------------------------------------------------------
# conversations
# --------------------------------------------------------------------------------------------


def test_llava_instruct(tmp_path):
    save_image(tmp_path / "coco" / "000000442786.jpg", RED)
    write_json(
        tmp_path / "conversation_58k.json",
        [
            {
                "id": "000000442786",
                "image": "000000442786.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": "A red square."},
                    {"from": "human", "value": "Is it large?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            },
            {"id": "2", "image": "000000442786.jpg", "conversations": [{"from": "human", "value": "Hi"}]},
            {
                "id": "3",
                "image": "000000442786.jpg",
                "conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Yo"}],
            },
        ],
    )
    source = LLaVAInstruct(tmp_path / "conversation_58k.json", tmp_path / "coco")
    sample = source[0]
    assert sample.task == "conversation" and sample.source == "llava_conversation"
    assert [(t.user, t.assistant) for t in sample.turns] == [
        ("What is shown?", "A red square."),
        ("Is it large?", "Yes."),
    ]
    assert close_to(color_of(sample.images[0]), RED)
    with pytest.raises(BadSample, match="pairs"):
        source[1]
    with pytest.raises(BadSample, match="alternate"):
        source[2]
    detail = LLaVAInstruct(tmp_path / "conversation_58k.json", tmp_path / "coco", task="detail")
    assert detail.name == "llava_detail" and detail[0].task == "detail"


def test_multitask_conversation(tmp_path):
    save_image(tmp_path / "train2014" / "COCO_train2014_000000001234.jpg", BLUE)
    write_json(
        tmp_path / "multitask_conversation.json",
        [
            {
                "id": "000000001234",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe it."},
                    {"from": "gpt", "value": "Blue."},
                ],
            }
        ],
    )
    sample = MultiTaskConversation(tmp_path / "multitask_conversation.json", tmp_path / "train2014")[0]
    assert sample.turns[0].user == "Describe it." and close_to(color_of(sample.images[0]), BLUE)


def test_unnatural_instructions(tmp_path):
    lines = [
        {
            "instruction": "Add.",
            "instances": [
                {
                    "instruction_with_input": "Add 2 and 3.",
                    "input": "2, 3",
                    "constraints": "Answer with a number.",
                    "output": "5",
                },
                {"instruction_with_input": "Add 1 and 1.", "input": "", "constraints": None, "output": "2"},
            ],
        },
        "not json {",
        {"instruction": "Nothing.", "instances": []},
    ]
    path = tmp_path / "core_data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    source = UnnaturalInstructions(path)
    assert len(source) == 4
    first = source[0]
    assert first.images == [] and first.task == "text"
    assert (first.turns[0].user, first.turns[0].assistant) == ("Add 2 and 3. Answer with a number.", "5")
    assert source[1].turns[0].user == "Add 1 and 1."
    with pytest.raises(BadSample, match="not JSON"):
        source[2]
    with pytest.raises(BadSample, match="no instances"):
        source[3]


def test_custom_json_and_jsonl(tmp_path):
    save_image(tmp_path / "photos" / "cat.jpg", RED, size=(200, 100))
    save_image(tmp_path / "photos" / "dog.jpg", BLUE)
    records = [
        {"image": "photos/cat.jpg", "task": "vqa", "conversations": [{"user": "What color?", "assistant": "Red."}]},
        {
            "image": "photos/cat.jpg",
            "conversations": [{"user": "Where is the cat?", "assistant": "At {box:cat}."}],
            "boxes": {"cat": [20, 10, 100, 60]},
        },
        {
            "image": "photos/cat.jpg",
            "task": "refer",
            "question": "the cat",
            "answer": "{box:cat}",
            "boxes": {"cat": [20, 10, 80, 50]},
            "box_format": "xywh",
        },
        {
            "image": ["photos/cat.jpg", "photos/dog.jpg"],
            "conversations": [{"user": "<ImageHere> vs <ImageHere>?", "assistant": "Different."}],
        },
        {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi!"}]},
        {"image": "photos/missing.jpg", "question": "?", "answer": "x"},
        {
            "image": "photos/cat.jpg",
            "conversations": [{"user": "<ImageHere>", "assistant": "x"}],
            "boxes": {"a": [0, 0, 1, 1]},
        },
        {
            "image": "photos/cat.jpg",
            "conversations": [{"user": "{box:dog}?", "assistant": "x"}],
            "boxes": {"cat": [0, 0, 1, 1]},
        },
        {
            "image": ["photos/cat.jpg", "photos/dog.jpg"],
            "conversations": [{"user": "<ImageHere> only one", "assistant": "x"}],
        },
        {"conversations": []},
        ["not", "an", "object"],
    ]
    write_json(tmp_path / "mine.json", records)
    source = CustomData(tmp_path / "mine.json")
    assert source.name == "mine" and len(source) == len(records)
    assert source[0].task == "vqa" and source[0].turns[0].assistant == "Red." and not source[0].geometry
    with_box = source[1]
    assert with_box.turns[0].assistant == "At {<10><10><50><60>}." and with_box.geometry
    assert with_box.task == "conversation"
    assert source[2].turns[0].assistant == "{<10><10><50><60>}" and source[2].task == "refer"
    two = source[3]
    assert len(two.images) == 2 and close_to(color_of(two.images[1]), BLUE)
    assert source[4].images == [] and source[4].turns[0].assistant == "Hi!"
    for index, message in [
        (5, "missing image"),
        (7, "box:dog"),
        (8, "place 1"),
        (9, "no 'conversations'"),
        (10, "JSON object"),
    ]:
        with pytest.raises(BadSample, match=message):
            source[index]
    assert len(source[6].images) == 1  # the sample's own placeholder is fine
    # the same records as JSONL, with a broken line, and images relative to another root
    (tmp_path / "data").mkdir()
    lines = [json.dumps(r) for r in records[:2]] + ["{broken"]
    (tmp_path / "data" / "mine.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = CustomData(tmp_path / "data" / "mine.jsonl", image_root=tmp_path)
    assert len(jsonl) == 3 and jsonl[1].turns[0].assistant == "At {<10><10><50><60>}."
    with pytest.raises(BadSample, match="not JSON"):
        jsonl[2]


def test_corrupt_image_is_a_bad_sample(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    write_json(tmp_path / "filter_cap.json", {"annotations": [{"image_id": "1", "caption": "x"}, {"caption": "no id"}]})
    source = CCSBUAlign(tmp_path)
    with pytest.raises(BadSample, match="corrupt image"):
        source[0]
    with pytest.raises(BadSample, match="malformed record"):
        source[1]
    assert list(source.samples()) == []  # both skipped


def test_registry_builds_every_kind_by_name(tmp_path):
    assert set(READERS) == {
        "webdataset",
        "cc_sbu_align",
        "coco_caption",
        "textcaps",
        "refcoco",
        "visual_genome",
        "flickr30k_entities",
        "vqav2",
        "okvqa",
        "aokvqa",
        "gqa",
        "ocrvqa",
        "llava",
        "multitask_conversation",
        "unnatural_instructions",
        "custom",
    }
    write_json(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    source = build_source("custom", path=tmp_path / "d.json")
    assert isinstance(source, CustomData) and source[0].turns[0].assistant == "a"
    with pytest.raises(KeyError, match="known kinds"):
        build_source("laion5b")
    with pytest.raises(FileNotFoundError):
        build_source("cc_sbu_align", root=tmp_path / "nowhere")


def test_clean_caption_is_blip_caption_processing():
    assert clean_caption('A "Dog"; runs: fast!!  (really)') == "a dog runs fast really"
    assert clean_caption("word " * 60).count("word") == 50
    assert clean_caption("###") == ""
