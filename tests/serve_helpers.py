"""Models and images for the serving tests.

* :func:`random_model_dir`: the tiny random model with the word tokenizer, saved (what a user's
  ``--model DIR`` would be);
* :func:`grounding_model`: the tiny architecture with a character tokenizer, trained for a few
  seconds to answer questions about one picture, grounding answers included. The word tokenizer
  decodes ``<p>`` as ``< p >`` and ``###`` as ``# # #``, so a model using it can never produce a box
  the parser reads nor stop at the template's end symbol; a character tokenizer decodes exactly.
"""

from __future__ import annotations

import base64
import io
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = (224, 224)
CIRCLE_BOX = [10, 20, 60, 70]
"""Where the red circle is, 0-100 of the image (MiniGPT-v2's box scale)."""
ANSWERS = [  # (question, task, answer) the grounding model learns
    ("describe the image", "grounding", "<p>red circle</p> {<10><20><60><70>}"),
    ("what color is the circle ?", "vqa", "red"),
    ("what color is the circle ?", None, "red"),
    ("describe the image", "caption", "a red circle on a white background"),
    ("describe the image", None, "a red circle on a white background"),
]


@contextmanager
def torch_threads(n: int):
    """Run with ``n`` torch threads: on a loaded 2-core machine one thread is ~50x faster for a tiny
    model than two threads spinning against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def circle_image() -> Image.Image:
    img = Image.new("RGB", IMAGE_SIZE, "white")
    w, h = IMAGE_SIZE
    x1, y1, x2, y2 = CIRCLE_BOX
    ImageDraw.Draw(img).ellipse([x1 * w / 100, y1 * h / 100, x2 * w / 100, y2 * h / 100], fill="red")
    return img


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(image: Image.Image | bytes, mime: str = "image/png") -> str:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def char_tokenizer():
    """One token per printable ASCII character (and newline); decoding joins them back exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tinygptv.testing import SPECIAL_TOKENS

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@lru_cache(maxsize=1)
def grounding_model():
    """The tiny model (context 512) with :func:`char_tokenizer`, trained to give :data:`ANSWERS` about
    :func:`circle_image` (a few seconds on one CPU thread). Built once per test process."""
    from tinygptv.config import get_preset
    from tinygptv.data.image_processing import image_processor_for
    from tinygptv.data.templates import get_template
    from tinygptv.model.tinygptv import TinyGPTV

    config = get_preset("tinygptv-tiny")
    config.language.max_position_embeddings = 512  # room for character-level multi-turn prompts
    with torch_threads(1):
        torch.manual_seed(0)
        model = TinyGPTV(config, tokenizer=char_tokenizer())
        template = get_template("stage4")
        prompts = [template.prompt(q, 1, task) for q, task, _ in ANSWERS]
        answers = [a + template.end_symbol for *_, a in ANSWERS]
        pixels = image_processor_for(config.vision.image_size)(circle_image())
        batch = model.prepare(prompts, [pixels] * len(ANSWERS), answers)
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(400):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.01:
                break
        assert loss.item() < 0.05, f"the tiny grounding model did not learn its answers (loss {loss.item():.3f})"
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def random_model_dir(directory: Path) -> Path:
    """The tiny random model with the word tokenizer, saved in our format."""
    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.testing import word_tokenizer

    torch.manual_seed(0)
    TinyGPTV("tinygptv-tiny", tokenizer=word_tokenizer()).save_pretrained(directory)
    return Path(directory)
