"""Image-caption data: webdataset pair shards (LAION, CC3M, SBU), MiniGPT-4's aligned set
(cc_sbu_align), COCO captions and TextCaps.

Every reader yields one turn: a caption instruction (used by instruction templates, ignored by
the stage 1-2 ``pretrain`` template) and the caption as the answer.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..instructions import clean_caption, instruction
from ..sample import BadSample, Sample, Turn, decode_image
from ..sources import ImageDir, RecordSource, Source, seeded_rng, stable_hash

logger = logging.getLogger("tinygptv.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image keys a webdataset sample may use (img2dataset writes ``jpg`` by default)."""


# --------------------------------------------------------------------------------------------
# webdataset shards
# --------------------------------------------------------------------------------------------


@dataclass
class _Cursor:
    """Where a streaming source's reader is: the iterator over one epoch and the next position."""

    seed: int
    epoch: int
    epoch_start: int
    position: int
    iterator: Iterator[dict]
    pid: int
    """Process that opened the iterator: a forked worker must not read through its parent's files."""


class WebDatasetPairs(Source):
    """Image-text pairs in webdataset tar shards, as img2dataset writes them.

    Each sample of a shard is ``KEY.jpg`` (or ``.png``/``.webp``), ``KEY.txt`` (the caption) and
    ``KEY.json`` (metadata, whose ``caption`` is used when there is no ``.txt``). Shards are read
    with the ``webdataset`` library.

    The stream for a seed: epoch ``e`` reads the shards in a seeded order through a seeded
    shuffle buffer. Asking for a position ahead of the reader skips samples without decoding
    them; asking for one behind restarts the epoch. Workers that draw interleaved positions each
    read the whole stream (a cost in I/O, not decoding) and all agree on which sample is where,
    whatever their number.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        name: str = "pairs",
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        clean: bool = True,
        max_words: int = 50,
    ):
        self.urls = expand_shards(urls)
        if not self.urls:
            raise FileNotFoundError(f"no shards found for {urls!r}")
        missing = [u for u in self.urls if _is_local(u) and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
        self.name = name
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.clean = clean
        self.max_words = max_words
        self.stream_errors = 0
        self._cursor: _Cursor | None = None
        self._epoch_length: int | None = None

    # --- the stream ---------------------------------------------------------------------------
    def _epoch(self, seed: int, epoch: int, shuffle: bool) -> Iterator[dict]:
        import webdataset as wds

        urls = list(self.urls)
        if shuffle:
            seeded_rng(seed, self.name, epoch, "shards").shuffle(urls)
        dataset = wds.WebDataset(
            urls,
            shardshuffle=False,  # the order is ours (seeded per epoch), not webdataset's
            nodesplitter=None,  # every process sees the whole stream: positions decide who uses what
            workersplitter=None,
            empty_check=False,
            handler=self._on_stream_error,
        )
        if shuffle and self.shuffle_buffer > 1:
            buffer_seed = stable_hash(seed, self.name, epoch, "buffer")
            dataset = dataset.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=buffer_seed)
        return iter(dataset)

    def _on_stream_error(self, exn: Exception) -> bool:
        # A truncated or unreadable shard: warn, count, and go on with the next member or shard.
        self.stream_errors += 1
        logger.warning("%s: error reading shards (%d so far): %s", self.name, self.stream_errors, exn)
        return True

    def _raw_at(self, position: int, seed: int) -> dict:
        cursor = self._cursor
        if cursor is None or cursor.pid != os.getpid() or cursor.seed != seed or position < cursor.position:
            epoch = position // self._epoch_length if self._epoch_length else 0
            start = epoch * (self._epoch_length or 0)
            cursor = _Cursor(seed, epoch, start, start, self._epoch(seed, epoch, self.shuffle), os.getpid())
            self._cursor = cursor
        while True:
            try:
                raw = next(cursor.iterator)
            except StopIteration:
                length = cursor.position - cursor.epoch_start
                if length == 0:
                    raise BadSample(f"{self.name}: no readable samples in {len(self.urls)} shard(s)") from None
                self._epoch_length = length
                cursor.epoch += 1
                cursor.epoch_start = cursor.position
                cursor.iterator = self._epoch(seed, cursor.epoch, self.shuffle)
                continue
            cursor.position += 1
            if cursor.position - 1 == position:
                return raw

    # --- samples ------------------------------------------------------------------------------
    def build(self, raw: dict, rng: random.Random | None) -> Sample:
        key = raw.get("__key__", "?")
        what = f"{self.name} {key}: "
        image_bytes = next((raw[k] for k in IMAGE_EXTENSIONS if k in raw), None)
        if image_bytes is None:
            raise BadSample(f"{what}no image ({'/'.join(IMAGE_EXTENSIONS)}) in the sample")
        caption = _caption_of(raw, what)
        if self.clean:
            caption = clean_caption(caption, self.max_words)
        if not caption:
            raise BadSample(f"{what}empty caption")
        return Sample(
            turns=[Turn(instruction("caption", rng), caption)],
            images=[decode_image(image_bytes, what)],
            task="caption",
            source=self.name,
            id=str(key),
            geometry=self.geometry,
        )

    def load(self, position: int, seed: int, rng: random.Random | None = None) -> Sample:
        return self.build(self._raw_at(position, seed), rng)

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        for count, raw in enumerate(self._epoch(0, 0, shuffle=False)):
            if limit is not None and count >= limit:
                return
            try:
                yield self.build(raw, None)
            except BadSample as err:
                logger.warning("skipped %s", err)

    def __getstate__(self) -> dict:
        # Open shard iterators stay with their process (spawned workers start their own).
        state = dict(self.__dict__)
        state["_cursor"] = None
        return state

    def __repr__(self) -> str:
        return f"WebDatasetPairs(name={self.name!r}, shards={len(self.urls)})"


def expand_shards(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard list from a brace pattern (``pairs-{00000..00009}.tar``), a folder (its ``*.tar``,
    sorted), or a list of either."""
    from braceexpand import braceexpand

    items = [urls] if isinstance(urls, (str, Path)) else list(urls)
    shards: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            shards.extend(str(p) for p in sorted(path.glob("*.tar")))
        else:
            shards.extend(braceexpand(str(item)))
    return shards


def _is_local(url: str) -> bool:
    """Whether ``url`` is a plain file path (webdataset also reads ``http://``, ``s3://``, ``pipe:`` ...)."""
    return "://" not in url and not url.startswith("pipe:")


def _caption_of(raw: dict, what: str) -> str:
    if "txt" in raw:
        data = raw["txt"]
        return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError as err:
            raise BadSample(f"{what}unreadable json metadata: {err}") from None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"]
    raise BadSample(f"{what}no caption (.txt, or 'caption' in .json)")


# --------------------------------------------------------------------------------------------
# JSON caption formats
# --------------------------------------------------------------------------------------------


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing file raises ``FileNotFoundError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with path.open("rb") as f:
        return json.load(f)


class CCSBUAlign(RecordSource):
    """MiniGPT-4's stage-2 aligned set (``cc_sbu_align``), used for TinyGPT-V's stage 3.

    ``ROOT/filter_cap.json`` is ``{"annotations": [{"image_id": "2", "caption": "..."}]}`` and the
    images are ``ROOT/image/{image_id}.jpg``. Each sample: a detailed-description instruction and
    the curated description.
    """

    def __init__(
        self,
        root: str | Path,
        name: str = "cc_sbu_align",
        image_dir: str | Path | None = None,
        image_ext: str = ".jpg",
        annotation_file: str = "filter_cap.json",
    ):
        root = Path(root)
        data = read_json(root / annotation_file)
        records = data["annotations"] if isinstance(data, dict) else data
        super().__init__(records, name)
        self.images = ImageDir(image_dir if image_dir is not None else root / "image")
        self.image_ext = image_ext

    def build(self, record: dict, rng: random.Random | None) -> Sample:
        caption = record["caption"].strip()
        if not caption:
            raise BadSample("empty description")
        image_id = str(record["image_id"])
        return Sample(
            turns=[Turn(instruction("detail", rng), caption)],
            images=[self.images.open(image_id + self.image_ext)],
            task="detail",
            id=image_id,
        )


class COCOCaptions(RecordSource):
    """COCO captions, one sample per caption.

    Reads the official ``captions_{split}.json`` (``images`` with ``id``/``file_name``,
    ``annotations`` with ``image_id``/``caption``) or the Karpathy-split list that LAVIS and
    MiniGPT-v2 use (``[{"image": "train2014/....jpg", "caption": "..." or [...]}]``).
    """

    def __init__(
        self, annotation_file: str | Path, image_dir: str | Path, name: str = "coco_caption", clean: bool = True
    ):
        data = read_json(annotation_file)
        records: list[tuple[str, str, Any]] = []
        if isinstance(data, dict):
            files = {img["id"]: img["file_name"] for img in data["images"]}
            for ann in data["annotations"]:
                records.append((files.get(ann.get("image_id"), ""), ann.get("caption"), ann.get("image_id")))
        else:
            for entry in data:
                captions = entry.get("caption")
                for caption in captions if isinstance(captions, list) else [captions]:
                    records.append((entry.get("image", ""), caption, entry.get("image_id")))
        super().__init__(records, name)
        self.images = ImageDir(image_dir)
        self.clean = clean

    def build(self, record: tuple, rng: random.Random | None) -> Sample:
        file_name, caption, image_id = record
        if not file_name:
            raise BadSample(f"caption of image {image_id} refers to no known image")
        caption = clean_caption(caption) if self.clean else caption.strip()
        if not caption:
            raise BadSample("empty caption")
        return Sample(
            turns=[Turn(instruction("caption", rng), caption)],
            images=[self.images.open(file_name)],
            task="caption",
            id=str(image_id),
        )


class TextCaps(RecordSource):
    """TextCaps (``TextCaps_0.1_{split}.json``): ``{"data": [{"image_id", "caption_str", ...}]}``,
    images ``{split}_images/{image_id}.jpg``. One sample per caption; task ``caption``."""

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, name: str = "textcaps", clean: bool = True):
        data = read_json(annotation_file)
        super().__init__(data["data"], name)
        self.images = ImageDir(image_dir)
        self.clean = clean

    def build(self, record: dict, rng: random.Random | None) -> Sample:
        caption = record["caption_str"]
        caption = clean_caption(caption) if self.clean else caption.strip()
        if not caption:
            raise BadSample("empty caption")
        image_id = str(record["image_id"])
        return Sample(
            turns=[Turn(instruction("caption", rng), caption)],
            images=[self.images.open(image_id + ".jpg")],
            task="caption",
            id=image_id,
        )


__all__ = ["CCSBUAlign", "COCOCaptions", "TextCaps", "WebDatasetPairs", "expand_shards", "read_json"]
