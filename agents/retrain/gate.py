"""The holdout gate: champion and challenger scored on the frozen holdout (labels never
trained on), and the decision whether the challenger replaces the champion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agents.retrain.dataset import Volume
from agents.trainer import evaluate
from radloop.modelspec import ModelSpec


@dataclass(frozen=True)
class HoldoutScores:
    """Mean Dice per label name on the holdout (`agents.metrics` policy); the champion's is
    None without a champion, both are empty without holdout labels."""

    challenger: dict[str, float]
    champion: dict[str, float] | None

    @property
    def challenger_mean(self) -> float | None:
        return _mean(self.challenger)

    @property
    def champion_mean(self) -> float | None:
        return _mean(self.champion)


def judge(
    challenger: torch.nn.Module,
    champion: torch.nn.Module | None,
    holdout: list[Volume],
    spec: ModelSpec,
) -> HoldoutScores:
    """Both networks on the same holdout volumes, at the volumes' own resolution."""
    volumes = [(v.hu, v.labels, v.spacing) for v in holdout]
    return HoldoutScores(
        challenger=evaluate(challenger, volumes, spec) if volumes else {},
        champion=evaluate(champion, volumes, spec) if volumes and champion else None,
    )


def decide(has_champion: bool, scores: HoldoutScores, margin: float) -> tuple[bool, str]:
    """Promote the challenger? Yes on a cold start; otherwise only when its mean holdout Dice
    is at least the champion's minus `margin`. The text says why, for people."""
    challenger, champion = scores.challenger_mean, scores.champion_mean
    if not has_champion:
        return True, "promoted: no champion yet (cold start)"
    if challenger is None or champion is None:
        return False, "rejected: no holdout labels to judge on"
    if challenger >= champion - margin:
        return True, (
            f"promoted: holdout Dice {challenger:.4f} >= champion {champion:.4f} - margin {margin}"
        )
    return False, (
        f"rejected by the gate: holdout Dice {challenger:.4f} < champion {champion:.4f} "
        f"- margin {margin}"
    )


def _mean(scores: dict[str, float] | None) -> float | None:
    return float(np.mean(list(scores.values()))) if scores else None
