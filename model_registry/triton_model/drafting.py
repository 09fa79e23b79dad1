"""Drafting one volume: its label map, uncertainty scores and embedding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from .window import Predictor, preprocess, resample, sliding_window


def _probabilities(model: Predictor, x: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    inference = config["inference"]
    logits = sliding_window(
        x,
        roi_size=inference["roi_size"],
        sw_batch_size=inference["sw_batch_size"],
        predictor=model,
        overlap=inference["overlap"],
    )
    return torch.softmax(logits, dim=1)


def _set_dropout(model: Any, active: bool) -> None:
    for module in model.modules():
        name = getattr(module, "original_name", type(module).__name__)
        if name.startswith("Dropout"):
            module.train(active)


def _region(mean: torch.Tensor) -> torch.Tensor:
    """Where a correction could matter: voxels with any foreground probability > 5 %."""
    region = mean[:, 1:].amax(dim=1) > 0.05
    return region if bool(region.any()) else torch.ones_like(region)


class Analysis(NamedTuple):
    """What drafting learns of one volume: the label map (uint8, the image's shape), the
    uncertainty scores in [0, 1] by method (`entropy` always, plus the spec's variance method),
    the score of the spec's own method, and a per-study embedding (float32) for diversity."""

    labels: NDArray[Any]
    scores: dict[str, float]
    score: float
    embedding: NDArray[Any]


def segment(
    model: Any, image: NDArray[Any], spacing: Sequence[float], config: dict[str, Any]
) -> tuple[NDArray[Any], float]:
    """Label map (uint8, the image's shape) and the uncertainty score of the spec's method."""
    analysis = analyse(model, image, spacing, config, embed=False)
    return analysis.labels, analysis.score


def analyse(
    model: Any,
    image: NDArray[Any],
    spacing: Sequence[float],
    config: dict[str, Any],
    embed: bool = True,
) -> Analysis:
    """Label map, uncertainty scores and embedding of one volume.

    Scores are taken over the voxels where any foreground class is plausible: the mean
    normalised entropy of the (mean) softmax, and for `mc_dropout` or `flip_tta` the mean
    predictive variance over dropout samples or flipped inputs.
    """
    device = next(iter(model.parameters())).device
    x = preprocess(image, spacing, config, device)
    method = config["uncertainty"]["method"]
    samples = int(config["uncertainty"].get("samples", 4))
    scores: dict[str, float] = {}
    with torch.inference_mode():
        if method == "entropy":
            mean = _probabilities(model, x, config)
        else:
            runs = []
            if method == "mc_dropout":
                _set_dropout(model, True)
                try:
                    runs = [_probabilities(model, x, config) for _ in range(samples)]
                finally:
                    _set_dropout(model, False)
            elif method == "flip_tta":
                flips: list[tuple[int, ...]] = [(), (2,), (3,), (4,), (2, 3), (3, 4)][:samples]
                for dims in flips:
                    flipped = torch.flip(x, dims) if dims else x
                    probs = _probabilities(model, flipped, config)
                    runs.append(torch.flip(probs, dims) if dims else probs)
            else:
                raise ValueError(f"unknown uncertainty method {method!r}")
            stacked = torch.stack(runs)
            mean = stacked.mean(dim=0)
            variance = stacked.var(dim=0, unbiased=False).sum(dim=1)
            region = _region(mean)
            scores[method] = _unit(float(variance[region].mean()) * 4.0)  # max sum is 0.25·2
        classes = mean.shape[1]
        entropy = -(mean * torch.log(mean.clamp_min(1e-8))).sum(dim=1) / math.log(classes)
        scores["entropy"] = _unit(float(entropy[_region(mean)].mean()))
        embedding = embed_volume(model, x, mean, config) if embed else np.zeros(0, np.float32)
        labels = mean.argmax(dim=1, keepdim=True).float()
        labels = resample(labels, image.shape, "nearest")
    return Analysis(
        labels=labels[0, 0].to(torch.uint8).cpu().numpy(),
        scores=scores,
        score=scores[method],
        embedding=embedding,
    )


def _unit(value: float) -> float:
    return min(1.0, max(0.0, value))


def _name(module: Any) -> str:
    return str(getattr(module, "original_name", type(module).__name__))


def _bottleneck(model: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The deepest features of a MONAI `UNet` (nested Sequential(down, SkipConnection, up)
    levels), run down its encoder only; None for a network of another shape."""
    layer = getattr(model, "model", None)
    if _name(model) != "UNet" or layer is None:
        return None
    while _name(layer) == "Sequential":
        down, skip, _ = list(layer.children())
        x = down(x)
        if _name(skip) != "SkipConnection":
            return None
        layer = skip.submodule
    return layer(x)  # type: ignore[no-any-return]


def embed_volume(
    model: Any, x: torch.Tensor, probabilities: torch.Tensor, config: dict[str, Any]
) -> NDArray[Any]:
    """A per-study embedding, L2-normalised: the network's bottleneck on the whole volume
    resized to one window, average- and max-pooled per channel; for a network whose bottleneck
    this cannot find, the foreground probabilities pooled to a 4×4×4 grid."""
    whole = resample(x, config["inference"]["roi_size"], "trilinear")
    features = _bottleneck(model, whole)
    if features is None:
        vector = F.adaptive_avg_pool3d(probabilities[:, 1:], 4).flatten()
    else:
        vector = torch.cat([features.mean(dim=(2, 3, 4)), features.amax(dim=(2, 3, 4))], 1)[0]
    vector = vector.float().cpu()
    norm = float(vector.norm())
    return (vector / norm if norm > 0 else vector).numpy().astype(np.float32)
