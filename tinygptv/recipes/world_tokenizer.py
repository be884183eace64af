"""The micro model's tokenizer: a small byte-level BPE trained on the shapes world's texts.

Phi-2 reads text with GPT-2's byte-level BPE (51,200 tokens); the micro model gets the same kind
of tokenizer, trained with the ``tokenizers`` library on what the world says, with at most the
micro LM's 1,024 rows. Byte-level means any text can be written (an unknown word falls back to
smaller pieces, never to ``<unk>``) and decoding gives back exactly what was encoded.

The world's vocabulary is small, so BPE runs out of pairs to merge below the limit: every word
the world uses becomes one token (with and without its leading space). Byte-level BPE never
merges letters with punctuation, though, so two kinds of strings are added as whole tokens:

* every box coordinate as boxes are written, ``<0>`` ... ``<100>`` (:func:`coordinate_tokens`),
  so that a box reads ``{`` ``<12>`` ``<40>`` ``<33>`` ``<61>`` ``}`` and copying a box out of a
  scene is copying four tokens verbatim (plain integers 0-100, the counts, are single tokens too);
* optionally (``template_markers``), the templates' markers and the task identifiers
  (:func:`template_tokens`: ``[INST]``, `` [/INST]``, ``<Img>``, ``###``, `` [vqa]``, ...), which
  every stage-4 turn repeats: nine tokens of each turn become three;
* optionally (``position_cells``), each two-word position of the world (`` top left``, ...,
  :func:`position_tokens`) as one token, so that each of the image's nine thirds-cells is one
  token: `` top`` (top middle) and `` top left`` then share nothing, where as words the second
  holds the first.

Texts are split at ``<ImageHere>`` before training, as :func:`tinygptv.data.encoding.encode_chunks`
tokenises the pieces around an image separately.

Special tokens: ``<pad>`` (0), ``<s>`` (1, prepended as BOS, as Llama's tokenizer does) and
``</s>`` (2, EOS), the ids of the ``tinygptv-micro`` preset.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from ..data.encoding import IMAGE_PLACEHOLDER
from ..data.boxes import SCALE

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
"""In id order: pad 0, bos 1, eos 2."""


def coordinate_tokens() -> list[str]:
    """``<0>`` ... ``<100>``: one token per box coordinate as boxes are written (``{<x1><y1><x2><y2>}``)."""
    return [f"<{k}>" for k in range(SCALE + 1)]


TEMPLATE_MARKERS = ("[INST]", " [/INST]", "<Img>", "</Img>", "###", "###Human:", " ###Assistant:")
"""The markers the templates write around every turn (:mod:`tinygptv.data.templates`), each as
written, leading space included."""


def template_tokens() -> list[str]:
    """One token per template marker and per task identifier (`` [vqa]``, ...): byte-level BPE
    never merges across punctuation, so ``[INST] [vqa]`` would otherwise be six tokens of every
    turn; as added tokens it is two, and a stage-4 turn is about a third shorter."""
    from ..data.templates import TASK_IDENTIFIERS

    return [*TEMPLATE_MARKERS, *(f" {tag}" for tag in TASK_IDENTIFIERS.values())]


def position_tokens() -> list[str]:
    """The world's two-word positions, as written after a word (`` top left``, ..., `` bottom
    right``) and at the start of an answer (``top left``, ...): with them as tokens every one of the
    nine position cells (:func:`~tinygptv.data.shapes.position_word`) is a single token."""
    from .pretrain import POSITIONS

    pairs = [where for where in POSITIONS if " " in where]
    return [*(f" {where}" for where in pairs), *pairs]


def tokenizer_training_texts(chunks: Iterable[str]) -> Iterator[str]:
    """The pieces of text the tokenizer will see: each chunk split at its image placeholders, and
    every coordinate 0-100 in box form."""
    for chunk in chunks:
        for piece in chunk.split(IMAGE_PLACEHOLDER):
            if piece:
                yield piece
    for _ in range(64):  # frequent enough to be merged like the other numbers
        yield "".join(f"{{<{k}><{k}><{k}><{k}>}}" for k in range(SCALE + 1))


def train_world_tokenizer(
    chunks: Iterable[str], vocab_size: int = 1024, template_markers: bool = False, position_cells: bool = False
):
    """A ``PreTrainedTokenizerFast`` trained on ``chunks`` (the world's text chunks, as templates
    write them), with at most ``vocab_size`` tokens; ``template_markers`` adds :func:`template_tokens`,
    ``position_cells`` :func:`position_tokens`. Deterministic for the same texts."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    added = [
        *coordinate_tokens(),
        *(template_tokens() if template_markers else ()),
        *(position_tokens() if position_cells else ()),
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_training_texts(chunks), trainer)
    tok.add_tokens([AddedToken(text, normalized=False) for text in added])
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )
    check_world_tokenizer(tokenizer, vocab_size)
    return tokenizer


def check_world_tokenizer(tokenizer, vocab_size: int) -> None:
    """Raise ``ValueError`` unless the tokenizer fits ``vocab_size`` rows, has the preset's special
    ids, and writes each integer 0-100 as one token."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size} rows")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise ValueError(f"special tokens {SPECIAL_TOKENS} got ids {ids}, expected 0, 1, 2")
    split = [k for k in range(SCALE + 1) if len(tokenizer(str(k), add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise ValueError(f"the numbers {split} are not single tokens: too little text to train the tokenizer on?")


__all__ = [
    "SPECIAL_TOKENS",
    "TEMPLATE_MARKERS",
    "check_world_tokenizer",
    "coordinate_tokens",
    "position_tokens",
    "template_tokens",
    "tokenizer_training_texts",
    "train_world_tokenizer",
]
