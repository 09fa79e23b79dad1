"""The heterogeneous phantom pool: its sub-populations come in their shares, each differs from
the common anatomy the way it says, and only truth.json tells which a study belongs to."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from radloop.app.phantoms import PhantomLabel, generate, sample_parameters
from radloop.app.phantoms.pool import SUBPOPULATIONS, pool_parameters, subpopulation_of, vary
from radloop.app.phantoms.render import render
from tests.servers import RADLOOP


def test_the_pool_mixes_every_sub_population_in_about_its_share() -> None:
    drawn = Counter(subpopulation_of(seed) for seed in range(2000))
    assert set(drawn) == set(SUBPOPULATIONS)
    for name, share in SUBPOPULATIONS.items():
        assert drawn[name] / 2000 == pytest.approx(share, abs=0.03), name
    assert [subpopulation_of(s) for s in range(50)] == [subpopulation_of(s) for s in range(50)]


def test_each_sub_population_changes_the_common_anatomy_as_it_says() -> None:
    common = sample_parameters(3, size=64)
    varied = {name: vary(common, name) for name in SUBPOPULATIONS}
    assert varied["common"] == common and common.subpopulation == "common"
    assert {name: v.subpopulation for name, v in varied.items()} == {n: n for n in SUBPOPULATIONS}
    assert varied["arterial"].hu["kidney"] >= 200 > common.hu["kidney"]
    assert varied["arterial"].hu["spleen"] > varied["arterial"].hu["liver"]
    assert varied["enlarged"].spleen.semi_axes[0] >= 1.4 * common.spleen.semi_axes[0] - 0.01
    assert varied["displaced"].kidneys[0].center[2] <= common.kidneys[0].center[2] - 25
    assert varied["noisy"].noise_sigma >= 45 > common.noise_sigma
    assert varied["fov"].slices < 31 < 48 <= common.slices
    assert 2 <= len(varied["lesions"].lesions) <= 5 and not common.lesions

    plain, spotted = render(common), render(varied["lesions"])
    liver = spotted.labels == PhantomLabel.LIVER
    # Lesions darken the liver but stay liver in the truth.
    assert np.array_equal(liver, plain.labels == PhantomLabel.LIVER)
    assert spotted.hu[liver].mean() < plain.hu[liver].mean() - 2


def test_demo_data_writes_a_pool_whose_sub_population_only_truth_json_holds(
    tmp_path: Path,
) -> None:
    out = tmp_path / "pool"
    written = subprocess.run(
        [
            RADLOOP,
            "demo",
            "data",
            "--pool",
            "--studies",
            "6",
            "--seed",
            "100",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    studies = json.loads(written.stdout)
    assert len(studies) == 6 and all("subpopulation" not in row for row in studies)
    for index, row in enumerate(studies):
        truth = json.loads((Path(row["dicom_dir"]).parent / "truth.json").read_text())
        assert truth["subpopulation"] == subpopulation_of(100 + index)
        assert truth["parameters"]["subpopulation"] == truth["subpopulation"]
        header = repr(dcmread(next(Path(row["dicom_dir"]).glob("*.dcm")))).lower()
        assert "subpopulation" not in header and truth["subpopulation"] not in header
    phantom = generate(100 + 0, size=64, pool=True)
    assert phantom.parameters == pool_parameters(100, size=64)
