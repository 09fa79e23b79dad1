"""A DICOM SEG read back as a label map on its series' grid, whatever its frame order, its
left-out frames and its segment numbers; a SEG made on other images does not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from agents.drafts import segment_descriptions, write_draft
from agents.segmentation import SegDoesNotFit, label_map_from_seg
from agents.volume import LoadedSeries, load_series
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from tests.dicom_files import enhanced_ct, generated_ct


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")


def _labels(shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    labels = np.zeros(shape, np.uint8)
    labels[1, 3:9, 4:10] = 1
    labels[3, 10:20, 5:7] = 2
    labels[3, 0:3, 0:3] = 3
    return labels


def _seg(series: LoadedSeries, pixels: np.ndarray[Any, Any], spec: ModelSpec, out: Path) -> Dataset:
    """A viewer's SEG: empty frames left out, only the segments it draws described."""
    present = sorted(int(v) for v in np.unique(pixels) if v) if pixels.ndim == 3 else [1, 2]
    seg = hd.seg.Segmentation(
        source_images=series.source,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            d for d in segment_descriptions(spec, None) if d.SegmentNumber in present
        ],
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(out)
    return dcmread(out)


def test_frames_left_out_read_as_empty_and_segments_hold_the_given_values(
    spec: ModelSpec, tmp_path: Path
) -> None:
    series = load_series(generated_ct(tmp_path / "ct", 5, size=32))
    labels = _labels(series.array.shape)
    ds = _seg(series, labels, spec, tmp_path / "seg.dcm")
    assert ds.NumberOfFrames < series.array.shape[0] * 3  # empty frames were left out

    np.testing.assert_array_equal(label_map_from_seg(ds, series), labels)
    swapped = label_map_from_seg(ds, series, {1: 2, 2: 1, 3: 3})
    np.testing.assert_array_equal(swapped, np.choose(labels, [0, 2, 1, 3]))
    only_liver = label_map_from_seg(ds, series, {1: 1})
    np.testing.assert_array_equal(only_liver, np.where(labels == 1, 1, 0))


def test_where_segments_overlap_the_highest_segment_number_wins(
    spec: ModelSpec, tmp_path: Path
) -> None:
    series = load_series(generated_ct(tmp_path / "ct", 4, size=32))
    masks = np.zeros((*series.array.shape, 2), bool)
    masks[2, 2:8, 2:8, 0] = True
    masks[2, 5:10, 5:10, 1] = True
    label_map = label_map_from_seg(_seg(series, masks, spec, tmp_path / "seg.dcm"), series)
    assert label_map[2, 6, 6] == 2 and label_map[2, 3, 3] == 1 and label_map[2, 9, 9] == 2


def test_a_draft_of_a_multi_frame_series_reads_back_frame_by_frame(
    spec: ModelSpec, tmp_path: Path
) -> None:
    enhanced, _ = enhanced_ct(tmp_path / "ct", 6)
    series = load_series([enhanced])
    labels = _labels(series.array.shape)
    files = write_draft(series, labels, spec, "1", tmp_path / "drafts")
    np.testing.assert_array_equal(label_map_from_seg(dcmread(files.seg_path), series), labels)


def test_a_seg_made_on_other_images_does_not_fit(spec: ModelSpec, tmp_path: Path) -> None:
    series = load_series(generated_ct(tmp_path / "a", 4, size=32))
    other = load_series(generated_ct(tmp_path / "b", 4, size=32))
    ds = _seg(other, _labels(other.array.shape), spec, tmp_path / "seg.dcm")
    with pytest.raises(SegDoesNotFit, match="outside the series"):
        label_map_from_seg(ds, series)
