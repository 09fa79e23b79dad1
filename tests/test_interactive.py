"""The interactive model's contract: its spec section, MONAI Label's clicks read into radloop's
(channel, slice, row, column), click maps, and the simulated reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agents.interactive import reader_clicks
from agents.review.assist import clicks_from_params
from agents.review.cases import Unprocessable
from model_registry.repository import inference_config
from model_registry.triton_model.clicks import click_maps, interactive_input
from radloop.modelspec import PACKAGED_MODELS, ModelSpecError, load_spec, load_specs

SPEC = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml", networks=False)


def test_the_interactive_section_names_the_model_and_checks_its_channels(tmp_path: Path) -> None:
    assert SPEC.interactive_name == "phantom-abdomen-deepedit"
    data = yaml.safe_load((PACKAGED_MODELS / "phantom-abdomen.yaml").read_text())
    data["interactive"]["network"]["args"]["in_channels"] = 5
    (tmp_path / "phantom-abdomen.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelSpecError, match=r"interactive.network.args.in_channels is 5; .* 8"):
        load_specs(tmp_path, networks=False)
    # A spec may not take the name another spec's interactive model is served under.
    data["interactive"]["network"]["args"]["in_channels"] = 8
    (tmp_path / "phantom-abdomen.yaml").write_text(yaml.safe_dump(data))
    clash = {**data, "name": "phantom-abdomen-deepedit"}
    del clash["interactive"]
    (tmp_path / "phantom-abdomen-deepedit.yaml").write_text(yaml.safe_dump(clash))
    with pytest.raises(ModelSpecError, match="name of another spec"):
        load_specs(tmp_path, networks=False)


def test_monai_label_clicks_become_channel_slice_row_column_and_bad_ones_are_refused() -> None:
    shape = (20, 30, 40)  # slices, rows, columns
    params = {
        "Liver": [[39, 1, 2]],  # [i, j, k] = column, row, slice
        "kidney": [[0, 29, 19], [5, 6, 7]],
        "background": [[1, 2, 3]],
        "client_id": "slicer",
        "label_names": {"Liver": 1},
    }
    clicks = clicks_from_params(params, SPEC, shape)
    assert sorted(clicks.tolist()) == [[0, 3, 2, 1], [1, 2, 1, 39], [3, 7, 6, 5], [3, 19, 29, 0]]
    # DeepGrow's form: foreground/background for the label named in `label`.
    grown = clicks_from_params({"foreground": [[1, 1, 1]], "label": "Spleen"}, SPEC, shape)
    assert grown.tolist() == [[2, 1, 1, 1]]
    bad_params: list[tuple[dict[str, Any], str]] = [
        ({"Liver": [[40, 0, 0]]}, "outside the image"),
        ({"Liver": [[0, 0, -1]]}, "outside the image"),
        ({"Liver": [[0, 0]]}, "not \\[i, j, k\\]"),
        ({"Liver": [[0.5, 0, 0]]}, "not \\[i, j, k\\]"),
        ({"Liver": "here"}, "must be a list"),
        ({"Lung": [[1, 1, 1]]}, "unknown label 'Lung'"),
        ({"foreground": [[1, 1, 1]]}, "need `label`"),
        ({"Liver": [[1, 1, 1]] * 11}, "at most 10"),
    ]
    for bad, reason in bad_params:
        with pytest.raises(Unprocessable, match=reason):
            clicks_from_params(bad, SPEC, shape)


def test_a_click_map_peaks_at_the_clicked_voxel_of_the_resized_grid() -> None:
    # A click on voxel (9, 20, 39) of a 10×40×40 image lands on (4, 10, 19) of 5×20×20.
    maps = click_maps(np.array([[2, 9, 20, 39]]), (10, 40, 40), (5, 20, 20), 4, sigma=1.0)
    assert maps.shape == (4, 5, 20, 20)
    assert float(maps[2].max()) == pytest.approx(1.0)
    peak = np.unravel_index(int(maps[2].argmax()), (5, 20, 20))
    assert tuple(int(i) for i in peak) == (4, 10, 19)
    assert float(maps[[0, 1, 3]].abs().sum()) == 0.0
    config = inference_config(SPEC.as_interactive())
    previous = np.zeros((10, 40, 40), dtype=np.uint8)
    previous[:, :20] = 3
    x = interactive_input(np.zeros((10, 40, 40)), np.zeros((0, 4)), previous, config, maps.device)
    assert x.shape == (1, 8, *config["interactive"]["spatial_size"])
    assert float(x[0, 7].mean()) == pytest.approx(0.5)  # Kidney one-hot: half the rows


def test_the_simulated_reader_clicks_the_centre_of_each_labels_largest_wrong_region() -> None:
    truth = np.zeros((20, 20, 20), dtype=np.uint8)
    truth[2:12, 2:12, 2:12] = 1  # Liver, missed entirely in the current label
    truth[14:18, 14:18, 14:18] = 2  # Spleen, right
    current = np.zeros_like(truth)
    current[14:18, 14:18, 14:18] = 2
    current[0:3, 15:20, 0:3] = 3  # Kidney spilled where truth is background
    clicks = reader_clicks(current, truth, [1, 2, 3]).tolist()
    assert len(clicks) == 2
    liver, kidney = clicks
    assert liver[0] == 1 and all(6 <= v <= 7 for v in liver[1:])
    assert kidney[0] == 0 and current[tuple(kidney[1:])] == 3
