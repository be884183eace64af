"""Mixing datasets by sample ratio: deterministic by seed, resumable at any step, multi-worker,
and tolerant of bad samples within a bound.

The paper mixes its stage-1/2 pairs 115:14 (LAION : CC3M+SBU) and its stage-4 sets with a ratio
each (ORIGINAL-NOTES, "Training recipe"). Here a *draw* ``g`` (0, 1, 2, ...) is a pure function of
``(seed, g)``:

1. its source: drawn with probability ``ratio / sum(ratios)`` from a seeded block of choices;
2. its position in that source: how many earlier draws chose the same source;
3. its sample: the source's ``position``-th sample (:mod:`tinygptv.data.sources`).

So a run restarted at step ``k`` sees exactly the draws ``k, k+1, ...`` it would have seen, any
worker can compute any draw, and the stream does not depend on the number of workers.

:class:`MixtureLoader` runs the draws through a ``torch.utils.data.DataLoader`` (the workers open
images and tokenise), skips a bad sample with a counted warning, reports the skips at the end of
each epoch, and stops with :class:`DataError` when more than ``max_bad_fraction`` of the draws
were bad.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .sample import BadSample, Sample
from .sources import Source, seeded_rng

if TYPE_CHECKING:
    from .batching import Collator

logger = logging.getLogger("tinygptv.data")


class DataError(RuntimeError):
    """Too many bad samples: the data, not one record, is broken."""


class Mixture:
    """Sources with sample ratios, and the deterministic assignment of draws to them."""

    BLOCK = 4096
    """Draws per seeded block of source choices."""

    def __init__(
        self,
        sources: Mapping[str, Source] | Sequence[Source],
        ratios: Mapping[str, float] | None = None,
        seed: int = 0,
    ):
        if not isinstance(sources, Mapping):
            sources = {s.name: s for s in sources}
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.sources = dict(sources)
        self.names = list(self.sources)
        ratios = dict(ratios) if ratios is not None else {name: 1.0 for name in self.names}
        unknown = sorted(set(ratios) - set(self.names))
        missing = sorted(set(self.names) - set(ratios))
        if unknown or missing:
            raise ValueError(f"ratios must name every source exactly: unknown {unknown}, missing {missing}")
        if any(ratios[n] < 0 for n in self.names) or sum(ratios.values()) <= 0:
            raise ValueError(f"ratios must be non-negative with a positive sum, got {ratios}")
        self.ratios = {n: float(ratios[n]) for n in self.names}
        empty = [
            n
            for n in self.names
            if self.ratios[n] > 0 and hasattr(self.sources[n], "__len__") and not len(self.sources[n])
        ]
        if empty:
            raise ValueError(f"source(s) {empty} have no records: nothing to draw from")
        total = sum(self.ratios.values())
        self.probabilities = [self.ratios[n] / total for n in self.names]
        self.seed = int(seed)
        self._cumulative: list[Any] = []  # counts per source before block b
        self._blocks: dict[int, tuple[Any, Any]] = {}

    def _choices(self, block: int):
        import numpy as np

        rng = np.random.default_rng([self.seed, block])
        return rng.choice(len(self.names), size=self.BLOCK, p=self.probabilities)

    def _block(self, block: int):
        """(source index, position in that source) of every draw of ``block``."""
        import numpy as np

        if block not in self._blocks:
            while len(self._cumulative) <= block:  # counts before each block, computed once
                b = len(self._cumulative)
                if b == 0:
                    self._cumulative.append(np.zeros(len(self.names), dtype=np.int64))
                else:
                    previous = self._blocks[b - 1][0] if (b - 1) in self._blocks else self._choices(b - 1)
                    counts = np.bincount(previous, minlength=len(self.names))
                    self._cumulative.append(self._cumulative[-1] + counts)
            choices = self._choices(block)
            positions = np.empty(self.BLOCK, dtype=np.int64)
            for k in range(len(self.names)):
                where = np.flatnonzero(choices == k)
                positions[where] = self._cumulative[block][k] + np.arange(len(where))
            if len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[block] = (choices, positions)
        return self._blocks[block]

    def locate(self, draw: int) -> tuple[str, int]:
        """``(source name, position in its stream)`` of draw number ``draw``."""
        if draw < 0:
            raise ValueError(f"draws are numbered from 0, got {draw}")
        block, offset = divmod(draw, self.BLOCK)
        choices, positions = self._block(block)
        return self.names[int(choices[offset])], int(positions[offset])

    def rng(self, draw: int) -> random.Random:
        """The random generator of draw ``draw`` (instruction phrasing, augmentation)."""
        return seeded_rng(self.seed, "draw", draw)

    def load(self, draw: int) -> Sample:
        """The sample of draw ``draw`` (raises :class:`BadSample` when it cannot be used)."""
        name, position = self.locate(draw)
        return self.sources[name].load(position, self.seed, self.rng(draw))

    def __repr__(self) -> str:
        mix = ", ".join(f"{n}: {r:g}" for n, r in self.ratios.items())
        return f"Mixture(seed={self.seed}, ratios={{{mix}}})"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class _Draw:
    step: int
    source: str
    item: Any = None
    error: str | None = None


class _DrawDataset:
    """Map-style dataset over draws (a ``torch.utils.data.Dataset`` by duck typing): item ``step``
    is this rank's ``step``-th draw, loaded and prepared, or the reason it could not be."""

    def __init__(self, mixture: Mixture, collator: "Collator | None", rank: int, world_size: int):
        self.mixture, self.collator, self.rank, self.world_size = mixture, collator, rank, world_size

    def __getitem__(self, step: int) -> _Draw:
        draw = step * self.world_size + self.rank
        name, position = self.mixture.locate(draw)
        rng = self.mixture.rng(draw)
        try:
            sample = self.mixture.sources[name].load(position, self.mixture.seed, rng)
            item = self.collator.prepare(sample, rng) if self.collator is not None else sample
            return _Draw(step, name, item)
        except BadSample as err:
            return _Draw(step, name, error=str(err))


class _Steps:
    """Sampler yielding steps ``start, start + 1, ...`` (endless)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _unbatched(item: Any) -> Any:
    return item


@dataclass
class SkipStats:
    """Counts of draws and of skipped (bad) draws, per source, with the first few reasons."""

    drawn: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.total_skipped:
            return f"{self.drawn} samples drawn, none skipped"
        per_source = ", ".join(f"{name}: {n}" for name, n in sorted(self.skipped.items()))
        lines = [f"{self.total_skipped} of {self.drawn} drawn samples skipped ({per_source})"]
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)


class MixtureLoader:
    """Batches of a :class:`Mixture`, loaded by ``num_workers`` processes, resumable by step.

    Iterate for an endless stream of batches, or call :meth:`epoch` for a fixed number followed by
    the epoch's skip report. ``state_dict()`` after a batch says where the next batch starts;
    ``load_state_dict`` (or ``start_step``) continues from there with the same samples. With a
    ``collator`` the batches are model-ready dicts; without, lists of :class:`Sample`.

    A bad sample (missing/corrupt image, malformed record, too long) is skipped with a warning and
    counted; once more than ``max_bad_fraction`` of the draws (counted over at least
    ``grace_draws``) were bad, :class:`DataError` stops the run. With ``world_size`` > 1 (data
    parallel), rank ``r`` takes draws ``r, r + world_size, ...``.
    """

    def __init__(
        self,
        mixture: Mixture,
        collator: "Collator | None" = None,
        batch_size: int = 1,
        num_workers: int = 0,
        start_step: int = 0,
        max_bad_fraction: float = 0.01,
        grace_draws: int = 100,
        rank: int = 0,
        world_size: int = 1,
        prefetch_factor: int = 2,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.mixture = mixture
        self.collator = collator
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        self.grace_draws = grace_draws
        self.rank, self.world_size = rank, world_size
        self.prefetch_factor = prefetch_factor
        self.step = start_step
        """This rank's next draw step: where the next batch starts."""
        self.stats = SkipStats()
        self.epoch_stats = SkipStats()
        self.last_report = ""
        """The skip report of the last finished :meth:`epoch`."""
        self._draws: Iterator[_Draw] | None = None

    # --- iteration ----------------------------------------------------------------------------
    def _open(self) -> Iterator[_Draw]:
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _DrawDataset(self.mixture, self.collator, self.rank, self.world_size),
            sampler=_Steps(self.step),
            batch_size=None,  # one draw at a time: batches form after bad draws are dropped
            collate_fn=_unbatched,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Any:
        """The next batch (a model-ready dict with a collator, else a list of samples)."""
        if self._draws is None:
            self._draws = self._open()
        items = []
        while len(items) < self.batch_size:
            draw = next(self._draws)
            self._count(draw)
            if draw.error is None:
                items.append(draw.item)
            last = draw.step
        self.step = last + 1
        return self.collator.collate(items) if self.collator is not None else items

    def epoch(self, num_batches: int) -> Iterator[Any]:
        """``num_batches`` batches, then the epoch's report (logged, and in :attr:`last_report`)."""
        self.epoch_stats = SkipStats()
        for _ in range(num_batches):
            yield self.next_batch()
        self.last_report = self.epoch_stats.summary()
        log = logger.warning if self.epoch_stats.total_skipped else logger.info
        log("data epoch done: %s", self.last_report)

    def _count(self, draw: _Draw) -> None:
        for stats in (self.stats, self.epoch_stats):
            stats.drawn += 1
            if draw.error is not None:
                stats.skipped[draw.source] += 1
                if len(stats.examples) < 5:
                    stats.examples.append(draw.error)
        if draw.error is not None:
            logger.warning(
                "skipped a bad sample (%d of %d drawn so far): %s",
                self.stats.total_skipped,
                self.stats.drawn,
                draw.error,
            )
            self._check(self.stats)

    def _check(self, stats: SkipStats) -> None:
        allowed = self.max_bad_fraction * max(stats.drawn, self.grace_draws)
        if stats.total_skipped > allowed:
            raise DataError(
                f"more than {self.max_bad_fraction:.1%} of the samples are bad; stopping. "
                f"{stats.summary()}\nFix or remove the broken records, or raise max_bad_fraction."
            )

    def close(self) -> None:
        """Stop the worker processes (a later batch starts new ones)."""
        self._draws = None

    # --- resuming -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: enough to continue it exactly."""
        return {
            "step": self.step,
            "seed": self.mixture.seed,
            "sources": list(self.mixture.names),
            "ratios": dict(self.mixture.ratios),
            "rank": self.rank,
            "world_size": self.world_size,
            "drawn": self.stats.drawn,
            "skipped": dict(self.stats.skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader over the same mixture)."""
        mine = self.state_dict()
        for key in ("seed", "sources", "ratios", "world_size"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"the saved data state has {key}={state[key]!r} but this loader has {mine[key]!r}: "
                    "it would not continue the same stream"
                )
        self.step = int(state["step"])
        self.stats = SkipStats(drawn=int(state.get("drawn", 0)), skipped=Counter(state.get("skipped", {})))
        self.close()


__all__ = ["DataError", "Mixture", "MixtureLoader", "SkipStats"]
