"""The Triton python-backend model: copied as `model.py` into every model version folder.

Self-contained on purpose — it imports only numpy and torch, so the same repository runs in
the `tritonserver` radloop starts and in NVIDIA's Triton container on a GPU. Not MONAI: Triton
starts a new stub process for every version it loads, and importing MONAI there made a hot
reload seconds slower; the Gaussian-weighted sliding window below is MONAI's
`sliding_window_inference(mode="gaussian")`, step for step (tests/test_sliding_window.py holds
it to MONAI's output). It also serves as the in-process backend of the unit tests and the
holdout gate (`segment`), so all of them run the same code.

One request: IMAGE (float32, slices × rows × columns, HU), SPACING (float32 [3], mm);
response: LABELS (uint8, same shape), UNCERTAINTY (float32 [1], the spec's method), SCORES
(float32 [3]: entropy, mc_dropout, flip_tta, NaN where not computed), EMBEDDING (float32 [d],
the study's embedding for diversity-aware selection), MODEL_VERSION (bytes [1]).
An interactive (DeepEdit) version also takes CLICKS (int32, n × 4: channel, slice, row,
column; channel 0 is background, n is the label value) and PREVIOUS (uint8, IMAGE's shape: the
label being refined); both are optional inputs, absent meaning no clicks and an empty label.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

Predictor = Callable[[torch.Tensor], torch.Tensor]


def _resample(volume: torch.Tensor, shape: Sequence[int], mode: str) -> torch.Tensor:
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
    return _resample(tensor[None, None], shape, "trilinear")


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
        labels = _resample(labels, image.shape, "nearest")
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
    whole = _resample(x, config["inference"]["roi_size"], "trilinear")
    features = _bottleneck(model, whole)
    if features is None:
        vector = F.adaptive_avg_pool3d(probabilities[:, 1:], 4).flatten()
    else:
        vector = torch.cat([features.mean(dim=(2, 3, 4)), features.amax(dim=(2, 3, 4))], 1)[0]
    vector = vector.float().cpu()
    norm = float(vector.norm())
    return (vector / norm if norm > 0 else vector).numpy().astype(np.float32)


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
    resized = _resample(tensor[None, None], size, "trilinear")[0]
    maps = click_maps(clicks, image.shape, size, labels + 1, config["interactive"]["sigma"])
    if previous is None:
        one_hot = torch.zeros((labels, *size))
    else:
        current = torch.from_numpy(np.ascontiguousarray(previous, dtype=np.float32))
        current = _resample(current[None, None], size, "nearest")[0, 0]
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
        labels = _resample(labels, image.shape, "nearest")
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


# The SCORES output: one value per method, NaN where the spec's method did not compute it.
SCORE_NAMES = ("entropy", "mc_dropout", "flip_tta")


def _answer(model: Any, config: dict[str, Any], request: Any, pb_utils: Any) -> Analysis:
    image = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
    spacing = pb_utils.get_input_tensor_by_name(request, "SPACING").as_numpy()
    if "interactive" not in config:
        return analyse(model, image, spacing.tolist(), config)
    clicks = pb_utils.get_input_tensor_by_name(request, "CLICKS")
    previous = pb_utils.get_input_tensor_by_name(request, "PREVIOUS")
    labels = refine(
        model,
        image,
        np.zeros((0, 4), np.int32) if clicks is None else clicks.as_numpy(),
        None if previous is None else previous.as_numpy(),
        config,
    )
    return Analysis(labels, {}, 0.0, np.zeros(0, np.float32))


def load(version_dir: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The TorchScript model and its spec from a repository version folder."""
    model: Any = torch.jit.load(  # type: ignore[no-untyped-call]
        str(version_dir / "model.pt"), map_location=device
    )
    model.eval()
    config = json.loads((version_dir / "spec.json").read_text())
    return model, config


class TritonPythonModel:
    """Entry point of Triton's python backend."""

    def initialize(self, args: dict[str, str]) -> None:
        self.version = args["model_version"]
        version_dir = Path(args["model_repository"]) / self.version
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.config = load(version_dir, self.device)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                answer = _answer(self.model, self.config, request, pb_utils)
                scores = [answer.scores.get(name, math.nan) for name in SCORE_NAMES]
                outputs = {
                    "LABELS": answer.labels,
                    "UNCERTAINTY": np.array([answer.score], dtype=np.float32),
                    "SCORES": np.array(scores, dtype=np.float32),
                    "EMBEDDING": answer.embedding,
                    "MODEL_VERSION": np.array([self.version.encode()], dtype=object),
                }
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()]
                    )
                )
            except Exception as error:  # one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{error}")))
        return responses
