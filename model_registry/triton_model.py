"""The Triton python-backend model: copied as `model.py` into every model version folder.

Self-contained on purpose — it imports only numpy, torch and MONAI, so the same repository
runs in the `tritonserver` radloop starts and in NVIDIA's Triton container on a GPU. It also
serves as the in-process backend of the unit tests (`segment`), so both run the same code.

One request: IMAGE (float32, slices × rows × columns, HU), SPACING (float32 [3], mm);
response: LABELS (uint8, same shape), UNCERTAINTY (float32 [1]), MODEL_VERSION (bytes [1]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers.utils import sliding_window_inference
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


def _probabilities(model: Predictor, x: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    inference = config["inference"]
    logits = sliding_window_inference(
        x,
        roi_size=inference["roi_size"],
        sw_batch_size=inference["sw_batch_size"],
        predictor=model,
        overlap=inference["overlap"],
        mode="gaussian",
    )
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(logits).__name__}, not a tensor")
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


def segment(
    model: Any, image: NDArray[Any], spacing: Sequence[float], config: dict[str, Any]
) -> tuple[NDArray[Any], float]:
    """Label map (uint8, the image's shape) and an uncertainty score in [0, 1].

    The score follows `config["uncertainty"]["method"]`: mean normalised softmax entropy,
    or the mean predictive variance over MC-dropout samples or flipped inputs, both taken over
    the voxels where any foreground class is plausible.
    """
    device = next(iter(model.parameters())).device
    x = preprocess(image, spacing, config, device)
    method = config["uncertainty"]["method"]
    samples = int(config["uncertainty"].get("samples", 4))
    with torch.inference_mode():
        if method == "entropy":
            mean = _probabilities(model, x, config)
            classes = mean.shape[1]
            entropy = -(mean * torch.log(mean.clamp_min(1e-8))).sum(dim=1) / math.log(classes)
            score = float(entropy[_region(mean)].mean())
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
            score = float(variance[_region(mean)].mean()) * 4.0  # max variance sum is 0.25·2
        labels = mean.argmax(dim=1, keepdim=True).float()
        labels = _resample(labels, image.shape, "nearest")
    return labels[0, 0].to(torch.uint8).cpu().numpy(), min(1.0, max(0.0, score))


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
                image = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                spacing = pb_utils.get_input_tensor_by_name(request, "SPACING").as_numpy()
                labels, score = segment(self.model, image, spacing.tolist(), self.config)
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("LABELS", labels),
                            pb_utils.Tensor("UNCERTAINTY", np.array([score], dtype=np.float32)),
                            pb_utils.Tensor(
                                "MODEL_VERSION", np.array([self.version.encode()], dtype=object)
                            ),
                        ]
                    )
                )
            except Exception as error:  # one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{error}")))
        return responses
