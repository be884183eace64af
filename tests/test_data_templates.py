"""Prompt templates: exact text, exact token ids and label masks per stage, multi-turn masking."""

import pytest

from tinygptv.data.encoding import IGNORE_INDEX, IMAGE_TOKEN_ID, encode_chunks
from tinygptv.data.sample import BadSample, Sample, Turn
from tinygptv.data.templates import TASK_IDENTIFIERS, Template, get_template, register_template, template_for_stage
from tinygptv.testing import word_tokenizer

Q = 4  # image tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def ids(tok, tokens: str) -> list[int]:
    """Ids of space-separated vocabulary tokens (independent of how templates tokenise)."""
    vocab = tok.get_vocab()
    return [vocab[t] for t in tokens.split()]


def image_sample(turns, task="vqa", n_images=1):
    from PIL import Image

    return Sample(turns=[Turn(u, a) for u, a in turns], images=[Image.new("RGB", (8, 8))] * n_images, task=task)


def test_pretrain_template_stage_1_2(tok):
    sample = image_sample([("Briefly describe this image.", "a red circle")], task="caption")
    template = get_template("pretrain")
    chunks = template.chunks(sample)
    assert chunks == [("<Img><ImageHere></Img>", False), ("a red circle\n", True)]
    enc = encode_chunks(tok, chunks, Q)
    prompt = ids(tok, "< img >") + [IMAGE_TOKEN_ID] * Q + ids(tok, "< / img >")
    answer = ids(tok, "a red circle")
    assert enc.input_ids == prompt + answer
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert template_for_stage(1) is template and template_for_stage(2) is template


def test_stage3_template_exact_tokens_and_mask(tok):
    sample = image_sample([("Describe this image.", "A red circle.")], task="detail")
    chunks = get_template("stage3").chunks(sample)
    assert chunks == [
        ("###Human: <Img><ImageHere></Img> Describe this image. ###Assistant: ", False),
        ("A red circle.###", True),
    ]
    enc = encode_chunks(tok, chunks, Q)
    prompt = (
        ids(tok, "# # # human : < img >")
        + [IMAGE_TOKEN_ID] * Q
        + ids(tok, "< / img > describe this image . # # # assistant :")
    )
    answer = ids(tok, "a red circle . # # #")
    assert enc.input_ids == prompt + answer
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + answer


def test_stage4_template_exact_tokens_and_mask(tok):
    sample = image_sample([("What color is the circle?", "red")], task="vqa")
    chunks = get_template("stage4").chunks(sample)
    assert chunks == [
        ("[INST] <Img><ImageHere></Img> [vqa] What color is the circle? [/INST]", False),
        ("red###", True),
    ]
    enc = encode_chunks(tok, chunks, Q)
    prompt = (
        ids(tok, "[ inst ] < img >")
        + [IMAGE_TOKEN_ID] * Q
        + ids(tok, "< / img > [ vqa ] what color is the circle ? [ / inst ]")
    )
    answer = ids(tok, "red # # #")
    assert enc.input_ids == prompt + answer
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + answer


@pytest.mark.parametrize("task", sorted(TASK_IDENTIFIERS))
def test_stage4_writes_each_task_identifier(task):
    sample = image_sample([("Look.", "ok")], task=task)
    first = get_template("stage4").chunks(sample)[0][0]
    assert first == f"[INST] <Img><ImageHere></Img> [{task}] Look. [/INST]"
    # stage 3 never writes identifiers
    assert "[" not in get_template("stage3").chunks(sample)[0][0]


def test_stage4_no_identifier_for_other_tasks_and_text_only():
    conv = image_sample([("Hi.", "Hello.")], task="conversation")
    assert get_template("stage4").chunks(conv)[0][0] == "[INST] <Img><ImageHere></Img> Hi. [/INST]"
    text_only = Sample(turns=[Turn("What is 2 plus 2?", "4")], task="text")
    assert get_template("stage4").chunks(text_only) == [("[INST] What is 2 plus 2? [/INST]", False), ("4###", True)]


def _target_spans(enc):
    """Runs of consecutive supervised positions, as lists of ids."""
    spans, current = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
                current = []
        else:
            assert label == i  # a supervised position predicts its own token
            current.append(i)
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("name", ["stage3", "stage4"])
def test_multi_turn_masks_only_assistant_turns(tok, name):
    sample = image_sample(
        [("What is in this image?", "a red circle"), ("What color is it?", "red"), ("How many?", "one")],
        task="conversation",
    )
    template = get_template(name)
    chunks = template.chunks(sample)
    assert [is_target for _, is_target in chunks] == [False, True] * 3
    enc = encode_chunks(tok, chunks, Q)
    assert _target_spans(enc) == [
        ids(tok, "a red circle # # #"),
        ids(tok, "red # # #"),
        ids(tok, "one # # #"),
    ]
    # the image appears once, in the first turn
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == Q
    assert [text.count("<ImageHere>") for text, _ in chunks] == [1, 0, 0, 0, 0, 0]


def test_multi_turn_exact_texts():
    sample = image_sample([("Q1?", "A1."), ("Q2?", "A2.")], task="conversation")
    assert get_template("stage3").chunks(sample) == [
        ("###Human: <Img><ImageHere></Img> Q1? ###Assistant: ", False),
        ("A1.###", True),
        ("Human: Q2? ###Assistant: ", False),  # the previous answer's ### separates the turns
        ("A2.###", True),
    ]
    assert get_template("stage4").chunks(sample) == [
        ("[INST] <Img><ImageHere></Img> Q1? [/INST]", False),
        ("A1.###", True),
        ("[INST] Q2? [/INST]", False),
        ("A2.###", True),
    ]


def test_inference_prompt_matches_training_context():
    template = get_template("stage4")
    sample = image_sample([("Q1?", "A1."), ("Q2?", "A2.")], task="vqa")
    chunks = template.chunks(sample)
    training_context = "".join(text for text, _ in chunks[:3])
    assert template.prompt("Q2?", num_images=1, task="vqa", history=[("Q1?", "A1.")]) == training_context
    assert (
        template.prompt("Where is the dog?", task="refer")
        == "[INST] <Img><ImageHere></Img> [refer] Where is the dog? [/INST]"
    )
    assert template.stop_strings == ("###",)
    assert get_template("pretrain").stop_strings == ()
    assert get_template("stage4-instruct").prompt("Hi", num_images=0) == "Instruct: Hi /n Output: "


def test_placeholders_in_user_text_are_kept_and_multi_image():
    sample = image_sample([("Compare <ImageHere> and <ImageHere>.", "same")], task="conversation", n_images=2)
    assert get_template("stage4").chunks(sample)[0][0] == "[INST] Compare <ImageHere> and <ImageHere>. [/INST]"
    two = image_sample([("Compare.", "same")], task="conversation", n_images=2)
    first = get_template("stage3").chunks(two)[0][0]
    assert first.count("<ImageHere>") == 2
    # a placeholder in a later turn: the texts place the image, none is added to the first turn
    later = image_sample([("Hi.", "Hello."), ("And this: <ImageHere>?", "A cat.")], task="conversation")
    chunks = get_template("stage4").chunks(later)
    assert chunks[0][0] == "[INST] Hi. [/INST]" and chunks[2][0] == "[INST] And this: <ImageHere>? [/INST]"
    assert get_template("stage4").prompt("And this: <ImageHere>?", history=[("Hi.", "Hello.")]) == (
        "[INST] Hi. [/INST]Hello.###[INST] And this: <ImageHere>? [/INST]"
    )


def test_pretrain_rejects_conversations_and_text_only():
    with pytest.raises(ValueError, match="one answer per sample"):
        get_template("pretrain").chunks(image_sample([("a", "b"), ("c", "d")]))
    with pytest.raises(ValueError, match="needs an image"):
        get_template("pretrain").chunks(Sample(turns=[Turn("a", "b")]))


def test_lookup_overrides_and_registration():
    with pytest.raises(KeyError, match="known templates"):
        get_template("stage5")
    custom = get_template("stage4", end_symbol="</s>")
    assert custom.end_symbol == "</s>" and get_template("stage4").end_symbol == "###"
    register_template(Template("test-chat", user_format="User: {}\nBot:", end_symbol="\n"), overwrite=True)
    sample = Sample(turns=[Turn("hi", "hello")])
    assert get_template("test-chat").chunks(sample) == [("User: hi\nBot:", False), ("hello\n", True)]
    with pytest.raises(ValueError, match="exists"):
        register_template(Template("test-chat", user_format="{}"))
    with pytest.raises(ValueError, match="exactly one"):
        Template("bad", user_format="no slot")
    with pytest.raises(ValueError):
        template_for_stage(5)


def test_sample_needs_turns():
    with pytest.raises(BadSample):
        Sample(turns=[])
