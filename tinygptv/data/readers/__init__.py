"""Readers of the public dataset formats of TinyGPT-V's four stages (paper Table 1), one class each.

=========================  ==============================  =================================
kind                       class                           data
=========================  ==============================  =================================
``webdataset``             :class:`WebDatasetPairs`        LAION / CC3M / SBU pair shards (stages 1-2)
``cc_sbu_align``           :class:`CCSBUAlign`             MiniGPT-4 aligned descriptions (stage 3)
``coco_caption``           :class:`COCOCaptions`           COCO captions
``textcaps``               :class:`TextCaps`               TextCaps
``refcoco``                :class:`RefCOCO`                RefCOCO / + / g, ``inverse=True``: identify
``visual_genome``          :class:`VisualGenomeRegions`    Visual Genome region descriptions
``flickr30k_entities``     :class:`Flickr30kEntities`      grounded captions, phrase <-> box
``vqav2`` / ``okvqa``      :class:`VQAv2` / :class:`OKVQA`  VQAv2, OK-VQA
``aokvqa``                 :class:`AOKVQA`                 A-OKVQA
``gqa``                    :class:`GQA`                    GQA
``ocrvqa``                 :class:`OCRVQA`                 OCR-VQA
``llava``                  :class:`LLaVAInstruct`          LLaVA conversation / detail / reason
``multitask_conversation`` :class:`MultiTaskConversation`  MiniGPT-v2 multi-task conversation
``unnatural_instructions`` :class:`UnnaturalInstructions`  Unnatural Instructions (text only)
``custom``                 :class:`CustomData`             your own JSON / JSONL (see :mod:`.custom`)
=========================  ==============================  =================================

Build one by kind with :func:`build_source` (what a YAML data config does).
"""

from __future__ import annotations

from typing import Any

from ..sources import Source
from .conversation import LLaVAInstruct, MultiTaskConversation, UnnaturalInstructions
from .custom import CustomData
from .grounding import Flickr30kEntities, RefCOCO, VisualGenomeRegions
from .pairs import CCSBUAlign, COCOCaptions, TextCaps, WebDatasetPairs
from .vqa import AOKVQA, GQA, OCRVQA, OKVQA, VQAv2

READERS: dict[str, type[Source]] = {
    "webdataset": WebDatasetPairs,
    "cc_sbu_align": CCSBUAlign,
    "coco_caption": COCOCaptions,
    "textcaps": TextCaps,
    "refcoco": RefCOCO,
    "visual_genome": VisualGenomeRegions,
    "flickr30k_entities": Flickr30kEntities,
    "vqav2": VQAv2,
    "okvqa": OKVQA,
    "aokvqa": AOKVQA,
    "gqa": GQA,
    "ocrvqa": OCRVQA,
    "llava": LLaVAInstruct,
    "multitask_conversation": MultiTaskConversation,
    "unnatural_instructions": UnnaturalInstructions,
    "custom": CustomData,
}


def build_source(kind: str, **kwargs: Any) -> Source:
    """The reader ``kind`` (a key of :data:`READERS`) built with ``kwargs``."""
    try:
        cls = READERS[kind]
    except KeyError:
        raise KeyError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(sorted(READERS))}") from None
    return cls(**kwargs)


__all__ = [
    "AOKVQA",
    "CCSBUAlign",
    "COCOCaptions",
    "CustomData",
    "Flickr30kEntities",
    "GQA",
    "LLaVAInstruct",
    "MultiTaskConversation",
    "OCRVQA",
    "OKVQA",
    "READERS",
    "RefCOCO",
    "TextCaps",
    "UnnaturalInstructions",
    "VQAv2",
    "VisualGenomeRegions",
    "WebDatasetPairs",
    "build_source",
]
