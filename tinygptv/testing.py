"""Small, deterministic building blocks for tests and examples: a word-level tokenizer and a tiny
model. Nothing here downloads anything.
"""

from __future__ import annotations

# Words the test tokenizer knows; everything else maps to <unk>. Template markers are split by the
# pre-tokenizer into punctuation and words, so they are covered by the symbols below.
_WORDS = (
    "a an the is are of in on at to and what which where how many color shape image picture this that "
    "there it yes no left right top bottom center red green blue yellow purple orange white black "
    "circle square triangle star diamond hexagon small large one two three four describe caption "
    "please human assistant inst vqa refer grounding identify detection img imagehere p dog cat sky "
    "photo shows with two objects object background"
).split()
_SYMBOLS = list("#:<>[]{}/.,?!'-_0123456789")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(add_bos: bool = False):
    """A word-level ``PreTrainedTokenizerFast`` with < 128 tokens (ids: pad 0, bos 1, eos 2, unk 3).

    With ``add_bos`` the tokenizer prepends ``<s>`` when called with ``add_special_tokens=True``,
    like Llama's; without, it adds nothing, like Phi-2's.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _SYMBOLS + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
