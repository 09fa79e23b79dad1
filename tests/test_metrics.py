"""Dice (`agents.metrics`): one policy for empty labels, for the correction effort and the
holdout gate alike."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agents.metrics import dice_per_label, mean_dice
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")  # Liver 1, Spleen 2, Kidney 3


def label_map(**boxes: tuple[slice, ...]) -> np.ndarray[Any, Any]:
    """A (4, 8, 8) map with each named label value filling its box."""
    values = {"liver": 1, "spleen": 2, "kidney": 3, "unknown": 7}
    out = np.zeros((4, 8, 8), dtype=np.uint8)
    for name, box in boxes.items():
        out[box] = values[name]
    return out


LIVER = (slice(0, 2), slice(0, 4), slice(0, 4))  # 32 voxels
HALF_LIVER = (slice(0, 1), slice(0, 4), slice(0, 4))  # 16 of them
SPLEEN = (slice(2, 4), slice(4, 8), slice(4, 8))


def test_a_label_absent_from_both_maps_scores_one(spec: ModelSpec) -> None:
    scores = dice_per_label(label_map(liver=LIVER), label_map(liver=LIVER), spec)
    assert scores == {"Liver": 1.0, "Spleen": 1.0, "Kidney": 1.0}


def test_a_false_positive_on_a_reference_without_the_label_scores_zero(spec: ModelSpec) -> None:
    predicted = label_map(liver=LIVER, spleen=SPLEEN)
    assert dice_per_label(predicted, label_map(liver=LIVER), spec)["Spleen"] == 0.0


def test_a_drafted_structure_the_reader_deleted_scores_zero(spec: ModelSpec) -> None:
    draft = label_map(liver=LIVER, spleen=SPLEEN)
    assert dice_per_label(draft, label_map(liver=LIVER), spec)["Spleen"] == 0.0


def test_overlap_scores_twice_the_intersection_over_both_sizes(spec: ModelSpec) -> None:
    scores = dice_per_label(label_map(liver=HALF_LIVER), label_map(liver=LIVER), spec)
    assert scores["Liver"] == pytest.approx(2 * 16 / (16 + 32))


def test_values_the_spec_does_not_name_count_as_background(spec: ModelSpec) -> None:
    predicted = label_map(liver=LIVER, unknown=SPLEEN)
    assert dice_per_label(predicted, label_map(liver=LIVER), spec) == {
        "Liver": 1.0,
        "Spleen": 1.0,
        "Kidney": 1.0,
    }


def test_maps_of_different_shapes_are_refused(spec: ModelSpec) -> None:
    with pytest.raises(ValueError, match="shape"):
        dice_per_label(np.zeros((4, 8, 8)), np.zeros((4, 8, 9)), spec)


def test_the_mean_is_over_every_label_of_the_spec(spec: ModelSpec) -> None:
    scores = dice_per_label(label_map(liver=HALF_LIVER), label_map(liver=LIVER), spec)
    assert mean_dice(scores) == pytest.approx((2 * 16 / 48 + 1.0 + 1.0) / 3)
