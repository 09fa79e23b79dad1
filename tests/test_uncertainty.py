"""The served model's uncertainty methods: each gives a score in [0, 1] and the same labels'
shape; a confident model scores lower than a confused one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from model_registry.repository import inference_config
from model_registry.triton_model.drafting import analyse, segment
from radloop.modelspec import PACKAGED_MODELS, load_spec


class Constant(torch.nn.Module):
    """Logits that favour background by `margin` everywhere, with dropout before the output."""

    def __init__(self, margin: float, classes: int = 4) -> None:
        super().__init__()
        self.margin = margin
        self.classes = classes
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.classes, *x.shape[2:]) + self.bias
        logits[:, 0] += self.margin
        out: torch.Tensor = self.dropout(logits + x)
        return out


@pytest.mark.parametrize("method", ["entropy", "mc_dropout", "flip_tta"])
def test_each_uncertainty_method_scores_in_range(method: str) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    config: dict[str, Any] = inference_config(spec)
    config["uncertainty"] = {"method": method, "samples": 3}
    image = np.random.default_rng(0).normal(40, 30, (20, 40, 40)).astype(np.float32)
    labels, score = segment(Constant(0.5).eval(), image, (3.0, 3.0, 3.0), config)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert 0.0 <= score <= 1.0
    # Entropy always comes too, so the entropy and hybrid strategies work under any method;
    # a network that is not a MONAI UNet is embedded by its pooled foreground probabilities.
    analysis = analyse(Constant(0.5).eval(), image, (3.0, 3.0, 3.0), config)
    assert set(analysis.scores) == {"entropy", method} and 0 <= analysis.score <= 1
    assert analysis.embedding.shape == (3 * 4**3,)
    assert np.linalg.norm(analysis.embedding) == pytest.approx(1, abs=1e-5)


def test_confident_model_is_less_uncertain_than_a_confused_one() -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    config = inference_config(spec)
    image = np.zeros((20, 40, 40), dtype=np.float32)
    _, confident = segment(Constant(8.0).eval(), image, (3.0, 3.0, 3.0), config)
    _, confused = segment(Constant(0.0).eval(), image, (3.0, 3.0, 3.0), config)
    assert confident < 0.1 < 0.9 < confused
