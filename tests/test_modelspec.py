"""Model specs: the shipped one is valid; each kind of mistake is refused naming file and key."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from radloop.modelspec import PACKAGED_MODELS, ModelSpecError, load_spec, load_specs
from tests.conftest_marks import ONCE
from tests.servers import RADLOOP

SAMPLE = PACKAGED_MODELS / "phantom-abdomen.yaml"


def test_shipped_spec_is_valid_and_builds_its_network() -> None:
    spec = load_spec(SAMPLE)
    assert [label.name for label in spec.labels] == ["Liver", "Spleen", "Kidney"]
    assert spec.labels[0].type.code == "10200004" and spec.labels[0].type.scheme == "SCT"
    assert spec.input.matches_description("PHANTOM ABDOMEN CT")
    network = spec.network.build()
    assert sum(p.numel() for p in network.parameters()) > 0


def _edited(tmp_path: Path, edit: Any) -> Path:
    data = yaml.safe_load(SAMPLE.read_text())
    edit(data)
    path = tmp_path / "phantom-abdomen.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d["network"].update(name="NoSuchNet"), "network.name"),
        (lambda d: d["network"]["args"].update(channelz=[1]), "network"),
        (lambda d: d["network"]["args"].update(out_channels=3), "out_channels"),
        (lambda d: d["input"].update(series_description="(unclosed"), "input.series_description"),
        (lambda d: d["preprocessing"]["window"].update(min=500), "preprocessing.window"),
        (lambda d: d["preprocessing"].update(spacing=[3, 0, 3]), "preprocessing.spacing"),
        (lambda d: d["labels"][1].update(value=7), "label values"),
        (lambda d: d["uncertainty"].update(method="bayes"), "uncertainty.method"),
        (lambda d: d["inference"].update(overlap=1.5), "inference.overlap"),
        (lambda d: d.pop("retraining"), "retraining"),
        (lambda d: d.update(unexpected=1), "unexpected"),
    ],
)
def test_invalid_spec_is_refused_naming_the_file_and_key(
    tmp_path: Path, edit: Any, key: str
) -> None:
    path = _edited(tmp_path, edit)
    with pytest.raises(ModelSpecError) as refused:
        load_spec(path)
    assert str(path) in str(refused.value) and key in str(refused.value)


def test_spec_name_must_match_its_file(tmp_path: Path) -> None:
    shutil.copy(SAMPLE, tmp_path / "other.yaml")
    with pytest.raises(ModelSpecError, match="differs from the file name"):
        load_specs(tmp_path)


def test_models_list_shows_a_spec_without_version_once(radloop_env: dict[str, str]) -> None:
    result = subprocess.run(
        [RADLOOP, "models", "list", "--json"], env=radloop_env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {
            "name": "phantom-abdomen",
            "version": None,
            "mlflow_version": None,
            "aliases": [],
            "holdout_dice": None,
            "served": False,
            "labels": ["Liver", "Spleen", "Kidney"],
            "modality": "CT",
        }
    ]


def test_models_check_stops_on_a_broken_spec(radloop_env: dict[str, str], tmp_path: Path) -> None:
    _edited(tmp_path, lambda d: d["labels"][0].pop("type"))
    env = {**radloop_env, "RADLOOP_MODELS_DIR": str(tmp_path)}
    result = subprocess.run([RADLOOP, "models", "check"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "labels.0.type" in result.stderr


@ONCE  # spec loading: nothing database-specific
def test_a_network_is_checked_by_what_builds_it_not_by_every_command(
    radloop_env: dict[str, str], tmp_path: Path
) -> None:
    _edited(tmp_path, lambda d: d["network"].update(name="NoSuchNet"))
    env = {**radloop_env, "RADLOOP_MODELS_DIR": str(tmp_path)}
    # The worklist needs the labels, not the network (and not MONAI's 7 s import).
    listed = subprocess.run(
        [RADLOOP, "queue", "list", "--json"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    # What builds one refuses it, naming the key (`models check`, as bootstrap, import and the
    # training worker do).
    refused = subprocess.run([RADLOOP, "models", "check"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2, refused.stdout
    assert "network.name" in refused.stderr and "NoSuchNet" in refused.stderr
