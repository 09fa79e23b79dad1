"""The holdout gate: champion and challenger scored on the frozen holdout (labels never
trained on), and the decision whether the challenger replaces the champion."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from agents.interactive import after_clicks
from agents.retrain.dataset import Volume
from agents.trainer import dice_per_volume, mean_dice
from radloop.modelspec import ModelSpec

PerVolume = dict[int, dict[str, float]]  # holdout label id -> Dice per label name


@dataclass(frozen=True)
class HoldoutScores:
    """Mean Dice per label name on the holdout (`agents.metrics` policy); the champion's is
    None without a champion, both are empty without holdout labels. Per holdout label too:
    the challenger's all, the champion's those computed here (the rest were known,
    `agents.retrain.scores`)."""

    challenger: dict[str, float]
    champion: dict[str, float] | None
    challenger_per_volume: PerVolume = field(default_factory=dict)
    champion_computed: PerVolume = field(default_factory=dict)

    @property
    def challenger_mean(self) -> float | None:
        return _mean(self.challenger)

    @property
    def champion_mean(self) -> float | None:
        return _mean(self.champion)


def score_volumes(network: torch.nn.Module, volumes: list[Volume], spec: ModelSpec) -> PerVolume:
    """Dice per label name of `network` on each volume, by label id; for an interactive model
    after `gate_clicks` simulated clicks per label from an empty label."""
    triples = [(v.hu, v.labels, v.spacing) for v in volumes]
    if spec.is_interactive:
        scores = [after_clicks(network, triple, spec) for triple in triples]
    else:
        scores = dice_per_volume(network, triples, spec)
    return {v.label_id: score for v, score in zip(volumes, scores, strict=True)}


def judge(
    challenger: torch.nn.Module,
    champion: torch.nn.Module | None,
    holdout: list[Volume],
    spec: ModelSpec,
    champion_known: PerVolume | None = None,
) -> HoldoutScores:
    """Both networks on the same holdout volumes, at the volumes' own resolution; the
    champion only on those it has no known score for."""
    if not holdout:
        return HoldoutScores(challenger={}, champion=None)
    ours = score_volumes(challenger, holdout, spec)
    theirs, computed = None, {}
    if champion is not None:
        known = {i: s for i, s in (champion_known or {}).items() if i in ours}
        computed = score_volumes(champion, [v for v in holdout if v.label_id not in known], spec)
        theirs = mean_dice([*known.values(), *computed.values()], spec)
    return HoldoutScores(
        challenger=mean_dice(list(ours.values()), spec),
        champion=theirs,
        challenger_per_volume=ours,
        champion_computed=computed,
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
