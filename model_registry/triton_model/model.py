"""Triton python backend's entry point (`TritonPythonModel`), and `load`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .clicks import refine
from .drafting import Analysis, analyse

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
