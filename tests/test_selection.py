"""The active-learning strategies on candidates whose scores and embeddings the test chooses:
each orders as it says, records what it ranked on, and a batch chosen together by a
diversity-aware strategy holds no near-duplicates."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.selection import (
    STRATEGIES,
    Candidate,
    near_distance,
    strategy,
)
from radloop.modelspec import SelectionStrategy

NO_COVER = np.zeros((0, 0))


def unit(*values: float) -> np.ndarray[Any, Any]:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_every_strategy_a_spec_may_name_is_registered() -> None:
    assert set(STRATEGIES) == {s.value for s in SelectionStrategy}
    with pytest.raises(ValueError, match="unknown active-learning strategy 'bald'"):
        strategy("bald")


def test_uncertainty_strategies_rank_by_their_own_score_and_put_unscored_cases_last() -> None:
    candidates = [
        Candidate(1, {"entropy": 0.2, "mc_dropout": 0.9}),
        Candidate(2, {"entropy": 0.7, "mc_dropout": 0.1}),
        Candidate(3, {}),
        Candidate(4, {"entropy": 0.5}),
    ]
    entropy = strategy("entropy").rank(candidates, NO_COVER, 10, 0)
    assert [p.key for p in entropy] == [2, 4, 1, 3]
    assert [p.value for p in entropy] == [0.7, 0.5, 0.2, None]
    dropout = strategy("mc_dropout").rank(candidates, NO_COVER, 2, 0)
    assert [p.key for p in dropout] == [1, 2]


def test_random_is_reproducible_from_its_seed_and_stable_as_cases_come_and_go() -> None:
    candidates = [Candidate(key, {}) for key in range(1, 41)]
    first = strategy("random").rank(candidates, NO_COVER, 40, 7)
    assert first == strategy("random").rank(candidates, NO_COVER, 40, 7)
    other_seed = strategy("random").rank(candidates, NO_COVER, 40, 8)
    assert [p.key for p in first] != [p.key for p in other_seed]
    # A case labelled (gone from the pool) leaves the others in the same relative order.
    rest = strategy("random").rank(candidates[1:], NO_COVER, 40, 7)
    assert [p.key for p in rest] == [p.key for p in first if p.key != 1]


def test_diversity_picks_far_from_what_is_covered_and_from_its_own_picks() -> None:
    twins = [Candidate(1, {}, unit(1, 0, -0.3)), Candidate(2, {}, unit(1, 0.01, -0.3))]
    apart = Candidate(3, {}, unit(0, 1, 0))
    near_covered = Candidate(4, {}, unit(0, 0.1, 1))
    covered = np.stack([unit(0, 0, 1)])  # a case already labelled
    picks = strategy("diversity").rank([*twins, apart, near_covered], covered, 4, 0)
    keys = [p.key for p in picks]
    # A twin is farthest from the covered case; then the case far from it; then the one near
    # the covered case, which is still farther from everything chosen than the other twin.
    assert keys[0] in (1, 2) and keys[1:3] == [3, 4] and {keys[0], keys[3]} == {1, 2}
    values = [p.value or 0.0 for p in picks]
    assert values == sorted(values, reverse=True)


def test_hybrid_takes_the_most_uncertain_but_not_a_near_duplicate_of_its_own_pick() -> None:
    candidates = [
        Candidate(1, {"entropy": 0.9}, unit(1, 0, 0)),
        Candidate(2, {"entropy": 0.8}, unit(1, 0.001, 0)),  # 1's twin
        Candidate(3, {"entropy": 0.3}, unit(0, 1, 0)),
        Candidate(4, {"entropy": 0.2}, unit(0, 0, 1)),
    ]
    assert [p.key for p in strategy("entropy").rank(candidates, NO_COVER, 2, 0)] == [1, 2]
    assert [p.key for p in strategy("hybrid").rank(candidates, NO_COVER, 2, 0)] == [1, 3]
    # The twin is not dropped, only put after the cases that are apart.
    assert [p.key for p in strategy("hybrid").rank(candidates, NO_COVER, 4, 0)] == [1, 3, 4, 2]


embeddings = st.lists(
    st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4).filter(
        lambda v: float(np.linalg.norm(v)) > 0.1
    ),
    min_size=2,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(embeddings, st.integers(1, 6), st.sampled_from(["diversity", "hybrid"]))
def test_a_diverse_batch_never_holds_two_near_duplicates_while_others_are_left(
    vectors: list[list[float]], k: int, name: str
) -> None:
    points = [unit(*v) for v in vectors]
    candidates = [Candidate(i, {"entropy": (i % 5) / 5}, p) for i, p in enumerate(points)]
    picks = strategy(name).rank(candidates, NO_COVER, k, 0)
    assert len({p.key for p in picks}) == len(picks) == min(k, len(points))
    chosen = np.stack([points[p.key] for p in picks])
    near = near_distance(np.stack(points))
    if name == "hybrid":
        # Only when every case left is near a pick may a near-duplicate join the batch.
        for index, pick in enumerate(picks[1:], start=1):
            before = chosen[:index]
            gap = float(np.linalg.norm(before - chosen[index], axis=1).min())
            if gap < near:
                left = [c for c in points if not any(np.allclose(c, b) for b in before)]
                assert all(float(np.linalg.norm(before - c, axis=1).min()) < near for c in left), (
                    pick
                )
    else:
        # Greedy k-centre: each pick is at least as far from the earlier ones as any case left.
        for index in range(1, len(picks)):
            before = chosen[:index]
            gap = float(np.linalg.norm(before - chosen[index], axis=1).min())
            others = [
                float(np.linalg.norm(before - points[c.key], axis=1).min())
                for c in candidates
                if c.key not in {p.key for p in picks[: index + 1]}
            ]
            assert all(gap >= other - 1e-9 for other in others)
