"""The metrics of the benchmarks, each from its official definition.

* :func:`vqa_accuracy`: the VQA accuracy of the official evaluation script (GT-Vision-Lab/VQA,
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) for VQAv2, OK-VQA and VizWiz: the answer
  is normalised (:func:`normalize_answer`), then scored against each leave-one-out subset of
  nine of the ten human answers as ``min(#matches / 3, 1)``, and the ten scores averaged.
* :func:`exact_match`: both sides normalised the same way, then compared (GQA, VSR).
* :func:`substring_match`: the lenient rule the original TinyGPT-V scripts used for GQA and VSR
  (the label anywhere inside the answer); reported beside exact match, clearly labelled.
* :func:`match_choice`: which of a multiple-choice question's options an answer names (IconQA).
* :func:`yes_no` and :func:`auroc`: Hateful Memes' label read from a yes/no answer, and the area
  under the ROC curve of a score.
* :func:`refer_iou`: the box an answer gives, against the annotated box (RefCOCO/+/g).
* :func:`caption_metrics`: CIDEr, BLEU-4, METEOR and ROUGE-L through pycocoevalcap.

The normalisation tables below are the official script's (facts, written out here).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import warnings
from typing import Iterable, Mapping, Sequence

# --- the official VQA answer normalisation ---------------------------------------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
"""Apostrophe-less spellings -> the contraction (the official ``contractions`` table)."""

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
"""Number words -> digits (the official ``manualMap``; note that "none" becomes "0")."""

ARTICLES = ("a", "an", "the")
"""Words dropped from answers."""

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
"""Characters removed or turned into spaces (the official ``punct`` list; no apostrophe, no colon)."""

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official pattern, verbatim: "(?!<=\d)" is a (typo'd) look-ahead that never matches "<=digit"
# after a period, so in effect every period not followed by a digit is removed ("2.5" keeps its).
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = 32
# The official script calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the
# ``count`` argument (re.UNICODE == 32), so at most 32 periods go. Kept for exact agreement.


def normalize_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each punctuation mark is deleted where it touches a space
    (or anywhere, when the text has a digit-comma-digit group) and becomes a space otherwise; then
    periods not followed by a digit are removed."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def normalize_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, articles dropped,
    apostrophe-less contractions restored, words re-joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """A model answer as the official script normalises it: newlines and tabs to spaces, stripped,
    then punctuation, digits, articles and contractions (``"Two."`` -> ``"2"``, ``"the dog"`` ->
    ``"dog"``, ``"dont"`` -> ``"don't"``)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_digits_articles(normalize_punctuation(text))


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """The official VQA accuracy of ``answer`` (0-1) given the human answers (ten in VQAv2, OK-VQA
    and VizWiz; OK-VQA's five are each listed twice).

    For each human answer, the others are the reference and the score is
    ``min(#others equal to the answer / 3, 1)``; the result is the mean over the leave-one-out
    subsets. The official script's quirk is kept: the human answers are normalised (punctuation
    only) only when they are not all identical, while the model answer is always normalised in full.
    """
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    prediction = normalize_answer(answer)
    humans = [h.replace("\n", " ").replace("\t", " ").strip() for h in human_answers]
    if len(set(humans)) > 1:
        humans = [normalize_punctuation(h) for h in humans]
    scores = []
    for k in range(len(humans)):
        others = humans[:k] + humans[k + 1 :]
        scores.append(min(1.0, sum(h == prediction for h in others) / 3))
    return sum(scores) / len(scores)


def exact_match(answer: str, targets: str | Iterable[str]) -> float:
    """1.0 when the normalised answer equals a normalised target, else 0.0."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    prediction = normalize_answer(answer)
    return float(any(prediction == normalize_answer(t) for t in targets))


def substring_match(answer: str, targets: str | Iterable[str]) -> float:
    """The original's lenient rule: 1.0 when a target, lower-cased, occurs anywhere in the
    lower-cased answer (counted once however many targets occur). An empty target never matches."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    text = answer.lower()
    return float(any(t.strip() and t.strip().lower() in text for t in targets))


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether the normalised ``phrase`` occurs in the normalised ``text`` as whole words."""
    words, target = normalize_answer(text).split(), normalize_answer(phrase).split()
    if not target:
        return False
    return any(words[k : k + len(target)] == target for k in range(len(words) - len(target) + 1))


def match_choice(answer: str, choices: Sequence[str]) -> int | None:
    """The index of the option ``answer`` names, or None.

    An answer equal to an option (after normalisation) names it; otherwise the options found inside
    the answer as whole words, and the longest of them when they nest ("3" inside "3 dogs" loses to
    "3 dogs"); several unrelated options found, or none, name nothing.
    """
    prediction = normalize_answer(answer)
    normalised = [normalize_answer(c) for c in choices]
    for k, choice in enumerate(normalised):
        if choice and prediction == choice:
            return k
    found = [k for k, c in enumerate(normalised) if c and contains_phrase(answer, choices[k])]
    if not found:
        return None
    longest = max(found, key=lambda k: len(normalised[k]))
    if all(contains_phrase(choices[longest], choices[k]) for k in found):
        return longest
    return None


def yes_no(answer: str) -> int | None:
    """1 for a yes, 0 for a no, None when the answer says neither: the first of the words "yes" /
    "no" in the normalised answer decides (words, so "not" or "know" never count as a no)."""
    for word in normalize_answer(answer).split():
        if word == "yes":
            return 1
        if word == "no":
            return 0
    return None


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (0-1): the probability that a random positive scores above a random
    negative, ties counting one half (the Mann-Whitney U statistic). None with one class only."""
    pairs = list(zip(scores, labels))
    positives = sum(1 for _, y in pairs if y == 1)
    negatives = len(pairs) - positives
    if positives == 0 or negatives == 0:
        return None
    # ranks of the scores, tied scores sharing their average rank
    order = sorted(range(len(pairs)), key=lambda k: pairs[k][0])
    ranks = [0.0] * len(pairs)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and pairs[order[end + 1]][0] == pairs[order[start]][0]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = sum(r for r, (_, y) in zip(ranks, pairs) if y == 1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


# --- boxes --------------------------------------------------------------------------------------

IOU_THRESHOLD = 0.5
"""A predicted box is right when its IoU with the annotated box is strictly above this (the
authors' RefCOCO scoring uses ``iou > 0.5``)."""


def refer_iou(answer: str, target_xyxy: Sequence[float], width: float, height: float):
    """``(iou, predicted pixel box)`` of the first box readable in ``answer`` (0-100 coordinates,
    :mod:`tinygptv.data.boxes`) against the annotated pixel box ``target_xyxy`` of an image of
    ``width`` x ``height``; ``(0.0, None)`` when the answer holds no box (an unparsable answer is wrong).

    IoU uses continuous areas ``(x2 - x1) * (y2 - y1)``; a box of zero area never matches anything.
    (The authors' ``computeIoU`` adds 1 to every side, the inclusive-pixel convention; on RefCOCO's
    objects, hundreds of pixels wide, the two agree to a fraction of a percent.)
    """
    from ..data.boxes import box_iou, denormalize_box, parse_box

    box = parse_box(answer)
    if box is None:
        return 0.0, None
    predicted = denormalize_box(box, width, height)
    return box_iou(predicted, target_xyxy), [round(v, 2) for v in predicted]


# --- captions -----------------------------------------------------------------------------------

CAPTION_METRICS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")


def caption_metrics(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]):
    """COCO caption metrics through pycocoevalcap: ``(metrics, per_item_cider, notes)``.

    ``metrics`` holds CIDEr, BLEU-4, METEOR and ROUGE-L, x100 as papers report them. Captions are
    tokenised by the Stanford PTB tokenizer, as the COCO server does; METEOR and the tokenizer need
    Java. Without Java, METEOR is None and a simple tokenizer (lower-case, the PTB tokenizer's
    punctuation removed) stands in, which ``notes`` says.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(predictions)
    gts = {k: [{"caption": c} for c in references[k]] for k in keys}
    # An empty caption would give the PTB tokenizer and METEOR an empty line; a lone period is
    # removed by the tokenizer and scores zero, like the empty caption it stands for.
    res = {k: [{"caption": predictions[k].strip() or "."}] for k in keys}
    notes: dict[str, str] = {}
    java = shutil.which("java") is not None
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        # One tokenizer run for references and answers (each run starts a Java VM, seconds).
        merged = {("ref", k): v for k, v in gts.items()} | {("res", k): v for k, v in res.items()}
        tokens = PTBTokenizer().tokenize(merged)
        gts_tok = {k: tokens[("ref", k)] for k in keys}
        res_tok = {k: tokens[("res", k)] for k in keys}
        notes["tokenizer"] = "Stanford PTB (pycocoevalcap)"
    else:
        gts_tok = {k: [_simple_tokens(c["caption"]) for c in v] for k, v in gts.items()}
        res_tok = {k: [_simple_tokens(c["caption"]) for c in v] for k, v in res.items()}
        notes["tokenizer"] = "simple (no Java for the PTB tokenizer)"
        warnings.warn("no Java found: METEOR is not computed and a simple tokenizer replaces PTB", stacklevel=2)
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts_tok, res_tok)
        rouge, _ = Rouge().compute_score(gts_tok, res_tok)
        cider, cider_per_item = Cider().compute_score(gts_tok, res_tok)
    meteor = None
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        meteor, _ = scorer.compute_score(gts_tok, res_tok)
        del scorer  # its __del__ ends the Java process
    else:
        notes["METEOR"] = "not computed: needs Java"
    metrics = {
        "CIDEr": 100 * float(cider),
        "BLEU-4": 100 * float(bleu[3]),
        "METEOR": None if meteor is None else 100 * float(meteor),
        "ROUGE-L": 100 * float(rouge),
    }
    return metrics, {k: float(s) for k, s in zip(gts_tok, cider_per_item)}, notes


_PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def _simple_tokens(text: str) -> str:
    tokens = re.findall(r"\w+|[^\w\s]+", text.lower())
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATION)


__all__ = [
    "ARTICLES",
    "CAPTION_METRICS",
    "CONTRACTIONS",
    "IOU_THRESHOLD",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "auroc",
    "caption_metrics",
    "contains_phrase",
    "exact_match",
    "match_choice",
    "normalize_answer",
    "normalize_digits_articles",
    "normalize_punctuation",
    "refer_iou",
    "substring_match",
    "vqa_accuracy",
    "yes_no",
]
