"""What the mixture draws from: a dataset as an endless, seeded, shuffled stream of samples.

Every reader is a :class:`Source`. Its one training entry point is ``load(position, seed, rng)``:
the ``position``-th sample of this source's stream for ``seed``. The stream is a pure function of
``(seed, position)``, so any worker can compute any draw, and a run restarted at a step sees the
same samples.

* :class:`RecordSource`: annotations that fit in memory (every JSON format). The stream is the
  records in a fresh seeded permutation per epoch; building a sample (opening its image, choosing
  an instruction phrasing) happens only when drawn.
* Streaming sources (webdataset shards, :mod:`tinygptv.data.readers.pairs`) read sequentially and
  skip ahead to the position asked for.
"""

from __future__ import annotations

import logging
import random
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator, Sequence

from .sample import BadSample, Sample, load_image

logger = logging.getLogger("tinygptv.data")

# Exceptions that mean "this record is malformed" when a reader builds a sample from it.
MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def stable_hash(*parts: Any) -> int:
    """A 32-bit hash of ``parts`` that is the same in every process (unlike ``hash`` of a str)."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())


def seeded_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` (e.g. ``seed, source, position``)."""
    return random.Random(stable_hash(*parts))


class Source(ABC):
    """A dataset the mixture can draw from."""

    name: str = "source"
    """Name in mixtures, statistics and reports."""
    geometry: bool = False
    """Mark every sample of this source as geometry-dependent (no random crop at train time), for
    datasets whose every text depends on the whole image (counts, positions)."""

    @abstractmethod
    def load(self, position: int, seed: int, rng: random.Random | None = None) -> Sample:
        """The ``position``-th sample of this source's shuffled stream for ``seed``.

        ``rng`` picks instruction phrasings (None: the first phrasing, for evaluation). Raises
        :class:`~tinygptv.data.sample.BadSample` when the record cannot be used.
        """

    @abstractmethod
    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        """The samples in file order with fixed phrasings (for evaluation and inspection); unusable
        records are skipped with a logged warning."""


class RecordSource(Source):
    """A dataset whose annotation records are held in memory; subclasses implement :meth:`build`."""

    def __init__(self, records: Sequence[Any], name: str, shuffle: bool = True):
        self.records = list(records)
        self.name = name
        self.shuffle = shuffle
        self._perm_key: tuple[int, int] | None = None
        self._perm: Any = None

    # --- subclass hook ------------------------------------------------------------------------
    @abstractmethod
    def build(self, record: Any, rng: random.Random | None) -> Sample:
        """Turn one record into a :class:`Sample` (open its image, phrase its instruction)."""

    # --- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int, rng: random.Random | None = None) -> Sample:
        """Sample of record ``index``; a record that cannot be used raises :class:`BadSample`."""
        try:
            sample = self.build(self.records[index], rng)
        except BadSample as err:
            raise BadSample(f"{self.name}[{index}]: {err}") from None
        except MALFORMED as err:
            raise BadSample(f"{self.name}[{index}]: malformed record ({type(err).__name__}: {err})") from None
        sample.source = sample.source or self.name
        sample.geometry = sample.geometry or self.geometry
        return sample

    def __getitem__(self, index: int) -> Sample:
        return self.get(index)

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        count = len(self) if limit is None else min(limit, len(self))
        for index in range(count):
            try:
                yield self.get(index)
            except BadSample as err:
                logger.warning("skipped %s", err)

    def index_at(self, position: int, seed: int) -> int:
        """Record index of stream ``position``: epoch ``position // len``, seeded permutation per epoch."""
        n = len(self.records)
        if n == 0:
            raise BadSample(f"{self.name}: the dataset has no records")
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset
        key = (seed, epoch)
        if self._perm_key != key:
            import numpy as np

            self._perm = np.random.default_rng([seed, stable_hash(self.name), epoch]).permutation(n)
            self._perm_key = key
        return int(self._perm[offset])

    def load(self, position: int, seed: int, rng: random.Random | None = None) -> Sample:
        return self.get(self.index_at(position, seed), rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, records={len(self.records)})"


class ImageDir:
    """Resolves image file names against one or more folders (the first that has the file wins)."""

    def __init__(self, roots: str | Path | Sequence[str | Path]):
        if isinstance(roots, (str, Path)):
            roots = [roots]
        self.roots = [Path(r) for r in roots]
        if not self.roots:
            raise ValueError("ImageDir needs at least one folder")

    def path(self, name: str) -> Path:
        for root in self.roots:
            candidate = root / name
            if candidate.exists():
                return candidate
        return self.roots[0] / name

    def open(self, name: str):
        """The RGB image ``name``; missing or corrupt raises :class:`BadSample`."""
        return load_image(self.path(name))


__all__ = ["MALFORMED", "ImageDir", "RecordSource", "Source", "seeded_rng", "stable_hash"]
