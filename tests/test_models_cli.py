"""`radloop models bootstrap|import|list`: versions a site can add, checked before they serve."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from monai.networks.nets.unet import UNet

from radloop.modelspec import PACKAGED_MODELS, load_spec
from tests.conftest_marks import ONCE
from tests.servers import RADLOOP

# Trains starter models and imports bundles (a minute and more).
# Trains, exports and serves models; nothing database-specific: the SQLite pass only.
pytestmark = [pytest.mark.slow, ONCE]


def radloop(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RADLOOP, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_bootstrap_trains_on_phantoms_and_adds_a_version(radloop_env: dict[str, str]) -> None:
    result = radloop(
        radloop_env, "models", "bootstrap", "phantom-abdomen",
        "--studies", "2", "--holdout", "1", "--epochs", "1", "--steps", "1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == 1 and set(report["holdout_dice"]) == {"Liver", "Spleen", "Kidney"}
    assert all(0.0 <= d <= 1.0 for d in report["holdout_dice"].values())
    listed = json.loads(radloop(radloop_env, "models", "list", "--json").stdout)
    assert [(m["name"], m["version"], m["served"]) for m in listed] == [
        ("phantom-abdomen", 1, False)
    ]


def test_import_takes_torchscript_that_fits_the_spec_and_refuses_the_rest(
    radloop_env: dict[str, str], tmp_path: Path
) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(spec.network.build().eval()), str(good))
    wrong = tmp_path / "wrong.pt"
    args = {**spec.network.args, "out_channels": 2}
    torch.jit.save(torch.jit.script(UNet(**args).eval()), str(wrong))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not weights")

    refused = radloop(radloop_env, "models", "import", "phantom-abdomen", str(wrong))
    assert refused.returncode == 2 and "the spec needs (1, 4" in refused.stderr
    assert radloop(radloop_env, "models", "import", "phantom-abdomen", str(junk)).returncode == 2
    imported = radloop(radloop_env, "models", "import", "phantom-abdomen", str(good))
    assert imported.returncode == 0, imported.stderr
    listed = json.loads(radloop(radloop_env, "models", "list", "--json").stdout)
    assert [m["version"] for m in listed] == [1]


def test_import_takes_a_monai_bundle_with_a_state_dict(
    radloop_env: dict[str, str], tmp_path: Path
) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    torch.save(spec.network.build().state_dict(), bundle / "models" / "model.pt")
    imported = radloop(radloop_env, "models", "import", "phantom-abdomen", str(bundle))
    assert imported.returncode == 0, imported.stderr
    empty = tmp_path / "empty-bundle"
    empty.mkdir()
    refused = radloop(radloop_env, "models", "import", "phantom-abdomen", str(empty))
    assert refused.returncode == 2 and "models/model.ts or models/model.pt" in refused.stderr
