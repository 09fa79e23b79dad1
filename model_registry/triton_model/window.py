"""Preprocessing and the Gaussian-weighted sliding window: MONAI's
`sliding_window_inference(mode="gaussian")`, step for step (tests/test_sliding_window.py holds it
to MONAI's output), without importing MONAI."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

Predictor = Callable[[torch.Tensor], torch.Tensor]


def resample(volume: torch.Tensor, shape: Sequence[int], mode: str) -> torch.Tensor:
    if tuple(volume.shape[-3:]) == tuple(shape):
        return volume
    if mode == "nearest":
        return F.interpolate(volume, size=tuple(shape), mode="nearest")
    return F.interpolate(volume, size=tuple(shape), mode="trilinear", align_corners=False)


def preprocess(
    image: NDArray[Any], spacing: Sequence[float], config: dict[str, Any], device: torch.device
) -> torch.Tensor:
    """HU volume -> (1, 1, S, R, C) tensor: windowed to [0, 1], resampled to the spec spacing."""
    window = config["preprocessing"]["window"]
    target = config["preprocessing"]["spacing"]
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device)
    tensor = (tensor.clamp(window["min"], window["max"]) - window["min"]) / (
        window["max"] - window["min"]
    )
    shape = [max(1, round(n * s / t)) for n, s, t in zip(image.shape, spacing, target, strict=True)]
    return resample(tensor[None, None], shape, "trilinear")


# MONAI's defaults for mode="gaussian": sigma is 1/8 of the window along each axis, and no
# weight falls below 1e-3 (so a voxel seen only by window edges still has a defined average).
_SIGMA_SCALE = 0.125
_MIN_WEIGHT = 1e-3


def gaussian_weights(
    roi: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight of each voxel of a window: a Gaussian centred on the window, as MONAI's
    `compute_importance_map(mode="gaussian", sigma_scale=0.125)` computes it."""
    weights = torch.ones((), dtype=torch.float, device=device)  # 1 · x is x, bit for bit
    for size in roi:
        sigma = size * _SIGMA_SCALE
        x = torch.arange(
            start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float, device=device
        )
        x = torch.exp(x**2 / (-2 * sigma**2))
        weights = weights.unsqueeze(-1) * x
    floor = max(float(weights.min()), _MIN_WEIGHT)
    return torch.clamp_(weights.to(torch.float), min=floor).to(dtype)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where the windows along one axis start: every `roi·(1 − overlap)` voxels (at least
    1), the last one moved back to end at the edge (MONAI's `dense_patch_slices`)."""
    step = roi if roi == size else max(1, int(roi * (1 - overlap)))
    count = next((i + 1 for i in range(math.ceil(size / step)) if i * step + roi >= size), 1)
    return [min(i * step, size - roi) for i in range(count)]


def sliding_window(
    x: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int,
    predictor: Predictor,
    overlap: float,
) -> torch.Tensor:
    """`predictor` over windows of `roi_size` of `x` (batch, channels, *spatial), blended
    with Gaussian weights — MONAI's `sliding_window_inference(..., mode="gaussian")` with its
    other defaults, in the same order of operations, so the sums round alike. A volume smaller
    than the window is padded with zeros (centred) and the answer cropped back."""
    spatial = tuple(x.shape[2:])
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != len(spatial):
        raise ValueError(f"roi_size {roi} does not fit an input of shape {tuple(x.shape)}")
    pad: list[int] = []  # F.pad's order: last axis first, (before, after) each
    for size, window in reversed(list(zip(spatial, roi, strict=True))):
        missing = max(window - size, 0)
        pad.extend([missing // 2, missing - missing // 2])
    if any(pad):
        x = F.pad(x, pad=pad, mode="constant", value=0.0)
    padded = tuple(x.shape[2:])
    corners = list(
        itertools.product(*(window_starts(n, r, overlap) for n, r in zip(padded, roi, strict=True)))
    )
    boxes = [tuple(slice(s, s + r) for s, r in zip(c, roi, strict=True)) for c in corners]
    weights = gaussian_weights(roi, x.device, x.dtype)[None, None]
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, *padded), dtype=x.dtype, device=x.device)
    windows = [(b, box) for b in range(x.shape[0]) for box in boxes]
    for first in range(0, len(windows), sw_batch_size):
        group = windows[first : first + sw_batch_size]
        parts = [x[(slice(b, b + 1), slice(None), *box)] for b, box in group]
        out = predictor(torch.cat(parts) if len(parts) > 1 else parts[0])
        if tuple(out.shape[2:]) != roi:
            raise ValueError(f"the model answered a {roi} window with {tuple(out.shape[2:])}")
        if total is None:
            total = torch.zeros((x.shape[0], out.shape[1], *padded), dtype=x.dtype, device=x.device)
            for box in boxes:
                count[(slice(None), slice(None), *box)] += weights
        out *= weights
        for (b, box), part in zip(group, out, strict=True):
            total[(slice(b, b + 1), slice(None), *box)] += part
    if total is None:
        raise ValueError(f"no window fits an input of shape {tuple(x.shape)}")
    total /= count
    if any(pad):
        lows = pad[::2][::-1]  # back to the axes' own order
        total = total[
            (
                slice(None),
                slice(None),
                *(slice(low, low + n) for low, n in zip(lows, spatial, strict=True)),
            )
        ]
    return total
