"""DeepEdit refinement: click maps, the interactive model's input, and the refined label."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from .window import resample


def click_maps(
    clicks: NDArray[Any], shape: Sequence[int], size: Sequence[int], channels: int, sigma: float
) -> torch.Tensor:
    """(channels, *size) click maps: each click (channel, slice, row, column on the image's
    grid `shape`) marks its voxel of the resized grid, each map is Gaussian-smoothed and scaled
    to a maximum of 1 (MONAI's `AddGuidanceSignalDeepEditd`)."""
    maps = torch.zeros((channels, *size), dtype=torch.float32)
    for channel, *index in np.asarray(clicks, dtype=np.int64).reshape(-1, 4).tolist():
        at = [
            min(n - 1, max(0, int((i + 0.5) * n / m)))
            for i, n, m in zip(index, size, shape, strict=True)
        ]
        maps[channel, at[0], at[1], at[2]] = 1.0
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    smooth = maps[:, None]
    for axis in range(3):
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        smooth = F.conv3d(smooth, kernel.view(view), padding=tuple(padding))
    peaks = smooth.amax(dim=(2, 3, 4), keepdim=True)
    return (smooth / torch.where(peaks > 0, peaks, torch.ones_like(peaks)))[:, 0]


def interactive_input(
    image: NDArray[Any],
    clicks: NDArray[Any],
    previous: NDArray[Any] | None,
    config: dict[str, Any],
    device: torch.device,
) -> torch.Tensor:
    """(1, 1 + (L + 1) + L, *spatial_size): the windowed image resized to the interactive
    model's size, a click map for background and each of the L labels, and the label being
    refined, one-hot for each label."""
    size = config["interactive"]["spatial_size"]
    labels = len(config["labels"])
    window = config["preprocessing"]["window"]
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    tensor = (tensor.clamp(window["min"], window["max"]) - window["min"]) / (
        window["max"] - window["min"]
    )
    resized = resample(tensor[None, None], size, "trilinear")[0]
    maps = click_maps(clicks, image.shape, size, labels + 1, config["interactive"]["sigma"])
    if previous is None:
        one_hot = torch.zeros((labels, *size))
    else:
        current = torch.from_numpy(np.ascontiguousarray(previous, dtype=np.float32))
        current = resample(current[None, None], size, "nearest")[0, 0]
        one_hot = torch.stack([(current == value).float() for value in range(1, labels + 1)])
    return torch.cat([resized, maps, one_hot])[None].to(device)


def refine(
    model: Any,
    image: NDArray[Any],
    clicks: NDArray[Any],
    previous: NDArray[Any] | None,
    config: dict[str, Any],
) -> NDArray[Any]:
    """The interactive model's label map (uint8, the image's shape) for `clicks` on
    `previous` (None: an empty label)."""
    device = next(iter(model.parameters())).device
    x = interactive_input(image, clicks, previous, config, device)
    size = config["interactive"]["spatial_size"]
    with torch.inference_mode():
        labels = model(x).argmax(dim=1, keepdim=True).float()
        labels = resample(labels, image.shape, "nearest")
        answer = labels[0, 0].to(torch.uint8).cpu().numpy()
        if previous is None or not len(clicks):
            return answer
        near = _near(clicks, image.shape, size, float(config["interactive"]["radius"]))
    return np.where(near, answer, np.asarray(previous, dtype=np.uint8))


def _near(
    clicks: NDArray[Any], shape: Sequence[int], size: Sequence[int], radius: float
) -> NDArray[Any]:
    """Voxels of the image grid within `radius` voxels of `size`'s grid of any click: where a
    refinement may change the label it starts from (a click does not move a far organ, and
    the label elsewhere is not resampled on every click)."""
    axes = [
        (torch.arange(n, dtype=torch.float32) + 0.5) * s / n - 0.5
        for n, s in zip(shape, size, strict=True)
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    near = torch.zeros(tuple(shape), dtype=torch.bool)
    for _, *index in np.asarray(clicks, dtype=np.int64).reshape(-1, 4).tolist():
        at = torch.tensor(
            [(i + 0.5) * s / n - 0.5 for i, n, s in zip(index, shape, size, strict=True)]
        )
        near |= ((grid - at[:, None, None, None]) ** 2).sum(dim=0) <= radius**2
    return near.numpy()
