"""The served model's sliding window is MONAI's, without MONAI: the torch-only Gaussian
window in `model_registry/triton_model/window.py` gives what
`sliding_window_inference(mode="gaussian")` gives, and loading the model's files (as Triton's
python-backend stub does) imports neither MONAI nor radloop."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from monai.inferers.utils import sliding_window_inference

from model_registry.repository import MODEL_CODE
from model_registry.triton_model.window import sliding_window
from tests.conftest_marks import ONCE

pytestmark = ONCE


class PositionSensitive(torch.nn.Module):
    """Several output channels from a padded convolution: a window's border voxels differ
    from its centre's, so a window placed or weighted wrongly changes the answer."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.tanh(self.conv(x)) * 3.0
        return out


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "sw_batch_size", "channels"),
    [
        ((1, 1, 48, 64, 64), (48, 64, 64), 0.25, 1, (1, 4)),  # exactly one window
        ((1, 1, 20, 30, 25), (48, 64, 64), 0.25, 1, (1, 4)),  # smaller than the window
        ((1, 1, 61, 37, 90), (24, 32, 32), 0.25, 1, (1, 4)),  # sizes no step divides
        ((1, 1, 50, 19, 70), (16, 24, 20), 0.5, 3, (1, 4)),  # smaller on one axis, batched
        ((2, 3, 33, 41, 29), (16, 16, 16), 0.25, 4, (3, 2)),  # two volumes, several channels
        ((1, 1, 40, 40, 40), (16, 16, 16), 0.0, 2, (1, 4)),  # no overlap
        ((1, 2, 35, 22, 53), (12, 20, 16), 0.75, 5, (2, 5)),  # heavy overlap
    ],
)
def test_the_torch_only_window_gives_monai_gaussian_sliding_window_output(
    shape: tuple[int, ...],
    roi: Sequence[int],
    overlap: float,
    sw_batch_size: int,
    channels: tuple[int, int],
) -> None:
    torch.manual_seed(0)
    x = torch.rand(shape) * 2 - 0.5
    network = PositionSensitive(*channels).eval()
    with torch.inference_mode():
        ours = sliding_window(x, roi, sw_batch_size, network, overlap)
        theirs = sliding_window_inference(
            x, roi, sw_batch_size, network, overlap=overlap, mode="gaussian"
        )
    assert isinstance(theirs, torch.Tensor)
    assert ours.shape == theirs.shape == (shape[0], channels[1], *shape[2:])
    torch.testing.assert_close(ours, theirs.as_subclass(torch.Tensor), rtol=1e-5, atol=1e-6)


def test_a_model_answering_another_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="answered"):
        sliding_window(torch.zeros(1, 1, 8, 8, 8), (4, 4, 4), 1, lambda w: w[..., :2], 0.25)


def test_loading_the_model_file_as_triton_does_imports_neither_monai_nor_radloop(
    tmp_path: Path,
) -> None:
    """Triton's stub imports a version folder's `model.py` as `<version>.model`, in a fresh
    process; a module there that pulled in MONAI made every version load seconds slower."""
    version = tmp_path / "1"
    version.mkdir()
    for code in MODEL_CODE:
        (version / code.name).write_bytes(code.read_bytes())
    probe = (  # the stub puts the model's folder on sys.path and imports `<version>.model`
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "module = importlib.import_module('1.model')\n"
        "assert hasattr(module, 'TritonPythonModel')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('monai', 'radloop',"
        " 'model_registry', 'agents'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
