"""Active-learning strategies: in which order a model's open cases are worth a reader's time.

A strategy is a plug-in (STYLE rule 10): an object with a `name`, what it `needs` of a draft
(an uncertainty score, the embedding, or nothing) and `rank`, registered in `STRATEGIES`.
`rank` orders candidates *together*: a diversity-aware strategy measures each next case against
the cases already covered (labelled or in a reader's hands) and those it picked before it, so
k readers served from one ranking never get two near-duplicates. Randomness is chosen and
recorded (rule 11): `random` draws each case's value from (seed, case key), so the order is
stable between reads and reproducible from the recorded seed.

The worklist (`agents.review`), the MONAI Label next-sample endpoint and
`bench/active_learning.py` all rank through this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

# What a draft can carry for ranking: an uncertainty score by method, or the embedding.
EMBEDDING = "embedding"
# Two cases closer than this share of the median distance between the candidates are
# near-duplicates: `hybrid` keeps them out of one batch, `diversity` ranks them far apart.
NEAR_SHARE = 0.5


@dataclass(frozen=True)
class Candidate:
    """An open case as a strategy sees it: a key (annotation id, or a pool index in the
    benchmark), the draft's uncertainty scores by method, and its embedding (None: none)."""

    key: int
    scores: Mapping[str, float]
    embedding: NDArray[Any] | None = None


@dataclass(frozen=True)
class Pick:
    """A ranked case and the value the strategy ranked it on (uncertainty, distance to the
    covered cases, or the seeded draw)."""

    key: int
    value: float | None


class Strategy(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def needs(self) -> str | None:
        """What a candidate must carry to be ranked on its merits: a score's name,
        `EMBEDDING`, or None; candidates without it come last."""
        ...

    def rank(
        self, candidates: Sequence[Candidate], covered: NDArray[Any], count: int, seed: int
    ) -> list[Pick]:
        """Up to `count` candidates, best first. `covered` holds the embeddings (rows) of the
        cases already labelled or being labelled."""
        ...


def _without(
    candidates: Sequence[Candidate], what: str | None
) -> tuple[list[Candidate], list[Candidate]]:
    """Candidates that carry `what`, and those that do not (ranked last, oldest key first)."""
    if what is None:
        return list(candidates), []
    has: list[Candidate] = []
    lacks: list[Candidate] = []
    for candidate in candidates:
        ok = (
            candidate.embedding is not None and candidate.embedding.size > 0
            if what == EMBEDDING
            else what in candidate.scores
        )
        (has if ok else lacks).append(candidate)
    return has, sorted(lacks, key=lambda c: c.key)


@dataclass(frozen=True)
class RandomStrategy:
    """The baseline: each case's value is a uniform draw from (seed, key)."""

    name: str = "random"

    @property
    def needs(self) -> str | None:
        return None

    def rank(
        self, candidates: Sequence[Candidate], covered: NDArray[Any], count: int, seed: int
    ) -> list[Pick]:
        draws = [
            Pick(c.key, float(np.random.default_rng([seed, c.key]).random())) for c in candidates
        ]
        return sorted(draws, key=lambda p: (-(p.value or 0.0), p.key))[:count]


@dataclass(frozen=True)
class UncertaintyStrategy:
    """Most uncertain first, by one of the draft's scores (`entropy`, `mc_dropout`,
    `flip_tta`); ties go to the older case."""

    name: str
    score: str

    @property
    def needs(self) -> str | None:
        return self.score

    def rank(
        self, candidates: Sequence[Candidate], covered: NDArray[Any], count: int, seed: int
    ) -> list[Pick]:
        has, lacks = _without(candidates, self.score)
        picks = sorted(
            (Pick(c.key, float(c.scores[self.score])) for c in has),
            key=lambda p: (-(p.value or 0.0), p.key),
        )
        return (picks + [Pick(c.key, None) for c in lacks])[:count]


def _matrix(candidates: Sequence[Candidate]) -> NDArray[Any]:
    return np.stack([np.asarray(c.embedding, dtype=np.float64) for c in candidates])


def _distances(points: NDArray[Any], others: NDArray[Any]) -> NDArray[Any]:
    """Euclidean distance of each row of `points` to its nearest row of `others` (inf: none)."""
    if others.size == 0:
        return np.full(len(points), np.inf)
    squared = (
        (points**2).sum(axis=1)[:, None] + (others**2).sum(axis=1)[None, :] - 2 * points @ others.T
    )
    nearest: NDArray[Any] = np.sqrt(np.clip(squared, 0.0, None)).min(axis=1)
    return nearest


def near_distance(embeddings: NDArray[Any]) -> float:
    """Below this distance two of `embeddings` are near-duplicates: `NEAR_SHARE` of the
    median distance between distinct pairs (0 with fewer than two)."""
    if len(embeddings) < 2:
        return 0.0
    points = np.asarray(embeddings, dtype=np.float64)
    squared = (points**2).sum(1)[:, None] + (points**2).sum(1)[None, :] - 2 * points @ points.T
    upper = np.sqrt(np.clip(squared[np.triu_indices(len(points), 1)], 0.0, None))
    return float(NEAR_SHARE * np.median(upper))


def _covered(covered: NDArray[Any], width: int) -> NDArray[Any]:
    """Covered embeddings of this width (a model's drafts of another shape are ignored)."""
    covered = np.asarray(covered, dtype=np.float64)
    if covered.ndim != 2 or covered.shape[1] != width:
        return np.zeros((0, width))
    return covered


@dataclass(frozen=True)
class DiversityStrategy:
    """Core-set (greedy k-centre, Sener & Savarese 2018) on the draft embeddings: each next case
    is the one farthest from every covered and already picked case. With nothing covered the
    first is the one farthest from the candidates' mean."""

    name: str = "diversity"

    @property
    def needs(self) -> str | None:
        return EMBEDDING

    def rank(
        self, candidates: Sequence[Candidate], covered: NDArray[Any], count: int, seed: int
    ) -> list[Pick]:
        has, lacks = _without(candidates, EMBEDDING)
        picks: list[Pick] = []
        if has:
            points = _matrix(has)
            known = _covered(covered, points.shape[1])
            nearest = _distances(points, known)
            if not np.isfinite(nearest).any():  # nothing covered: start from the outermost
                nearest = np.full(len(has), np.inf)
                start = _distances(points, points.mean(axis=0, keepdims=True))
            left = list(range(len(has)))
            while left and len(picks) < count:
                by = nearest if np.isfinite(nearest).any() else start
                best = max(left, key=lambda i: (by[i], -has[i].key))
                picks.append(Pick(has[best].key, float(by[best])))
                left.remove(best)
                nearest = np.minimum(nearest, _distances(points, points[best : best + 1]))
        return (picks + [Pick(c.key, None) for c in lacks])[:count]


@dataclass(frozen=True)
class HybridStrategy:
    """Uncertainty with a diversity constraint: most uncertain first, but a case within the
    near-duplicate distance of a covered or already picked case waits until no other case is
    left (Zhdanov 2019's "diverse mini-batch" idea, greedily)."""

    name: str = "hybrid"
    score: str = "entropy"

    @property
    def needs(self) -> str | None:
        return self.score

    def rank(
        self, candidates: Sequence[Candidate], covered: NDArray[Any], count: int, seed: int
    ) -> list[Pick]:
        scored, lacks = _without(candidates, self.score)
        has, flat = _without(scored, EMBEDDING)
        order = sorted(has, key=lambda c: (-float(c.scores[self.score]), c.key))
        picks: list[Pick] = []
        if order:
            points = _matrix(order)
            known = _covered(covered, points.shape[1])
            near = near_distance(np.concatenate([points, known]))
            nearest = _distances(points, known)
            left = list(range(len(order)))
            while left and len(picks) < count:
                apart = [i for i in left if nearest[i] >= near]
                best = apart[0] if apart else left[0]
                picks.append(Pick(order[best].key, float(order[best].scores[self.score])))
                left.remove(best)
                nearest = np.minimum(nearest, _distances(points, points[best : best + 1]))
        rest = sorted(flat, key=lambda c: (-float(c.scores[self.score]), c.key))
        tail = [Pick(c.key, float(c.scores[self.score])) for c in rest]
        return (picks + tail + [Pick(c.key, None) for c in lacks])[:count]


_ALL: tuple[Strategy, ...] = (
    RandomStrategy(),
    UncertaintyStrategy("entropy", "entropy"),
    UncertaintyStrategy("mc_dropout", "mc_dropout"),
    UncertaintyStrategy("flip_tta", "flip_tta"),
    DiversityStrategy(),
    HybridStrategy(),
)
STRATEGIES: dict[str, Strategy] = {strategy.name: strategy for strategy in _ALL}
# Recorded for a case shown first because a reviewer marked it urgent: not a learning choice.
URGENT = "urgent"


def strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown active-learning strategy {name!r} (known: {known})") from None


def embedding_bytes(vector: NDArray[Any]) -> bytes | None:
    """How an embedding is stored (float32, little-endian); None for an empty one."""
    array = np.asarray(vector, dtype="<f4").ravel()
    return array.tobytes() if array.size else None


def embedding_array(data: bytes | None) -> NDArray[Any] | None:
    return None if not data else np.frombuffer(data, dtype="<f4").astype(np.float32)
