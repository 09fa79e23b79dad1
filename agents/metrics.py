"""Dice between two label maps, computed by MONAI, with radloop's one policy for empty labels.

Used wherever radloop compares segmentations: a reader's correction against its draft (the
correction effort, `agents.review.corrections`) and a model's prediction against the frozen
holdout (`agents.trainer.evaluate`, hence the retraining gate and the model card).

Label maps hold the spec's label values (0 is background; values the spec does not name count
as background). **A label absent from both maps scores 1.0; a label present in only one
scores 0.0.** Agreeing that a structure is not there is agreement, and chosen so that:

* every (case, label) has a score: the gate averages champion and challenger over the same
  volumes and labels, and a per-label record always lists every label of the spec;
* a false positive on a reference without that structure costs the full 0.0, and a reader who
  deletes a drafted structure made a full correction. MONAI's default (`ignore_empty=True`)
  looks at the reference alone and would drop both as NaN; skipping labels absent from both
  would make the gate compare means over different volumes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from radloop.modelspec import ModelSpec


def dice_per_label(
    predicted: NDArray[Any], reference: NDArray[Any], spec: ModelSpec
) -> dict[str, float]:
    """Dice(predicted, reference) for every label of `spec`, by label name (same-shaped maps;
    empty labels as the module says)."""
    # Imported here: the CLI's queue commands reach this module through the review intake,
    # and torch with MONAI take seconds to import that a listing never needs.
    import torch
    from monai.metrics.meandice import compute_dice

    if predicted.shape != reference.shape:
        raise ValueError(f"label maps differ in shape: {predicted.shape} != {reference.shape}")
    # Spec values -> class indices 1..n, so MONAI's one call scores each label as a class.
    lookup = np.zeros(256, dtype=np.uint8)
    for index, label in enumerate(spec.labels, start=1):
        lookup[label.value] = index

    def classes(label_map: NDArray[Any]) -> torch.Tensor:
        return torch.from_numpy(lookup[label_map.astype(np.uint8)])[None, None]

    scores = compute_dice(
        classes(predicted),
        classes(reference),
        include_background=False,
        ignore_empty=False,
        num_classes=len(spec.labels) + 1,
    )[0]
    return {label.name: float(score) for label, score in zip(spec.labels, scores, strict=True)}


def mean_dice(scores: dict[str, float]) -> float:
    """The mean over labels of `dice_per_label`'s scores."""
    if not scores:
        raise ValueError("no label scores to average")
    return float(np.mean(list(scores.values())))
