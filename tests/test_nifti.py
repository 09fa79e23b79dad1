"""NIfTI in radloop's convention: what is written reads back as the same voxels on the same
grid, and the file is the RAS (column, row, slice) image other tools expect."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from agents.nifti import (
    NotAVolume,
    lps_to_ras_affine,
    ras_to_lps_affine,
    read_label_map,
    read_nifti,
    voxel_spacing,
    write_nifti,
)

# An oblique grid: (slice, row, column) -> LPS, spacing (2.5, 0.7, 0.8) mm.
_ROTATION = np.array(
    [
        [np.cos(0.3), -np.sin(0.3), 0.0],
        [np.sin(0.3), np.cos(0.3), 0.0],
        [0.0, 0.0, 1.0],
    ]
)
LPS_AFFINE = np.eye(4)
LPS_AFFINE[:3, :3] = _ROTATION @ np.array([[0, 0, 0.8], [0, 0.7, 0], [2.5, 0, 0]])
LPS_AFFINE[:3, 3] = (-120.0, 95.5, -310.25)


def test_the_affine_round_trip_is_exact() -> None:
    np.testing.assert_allclose(ras_to_lps_affine(lps_to_ras_affine(LPS_AFFINE)), LPS_AFFINE)
    np.testing.assert_allclose(lps_to_ras_affine(ras_to_lps_affine(LPS_AFFINE)), LPS_AFFINE)


def test_a_voxel_lands_at_the_same_patient_point_in_either_convention() -> None:
    slice_, row, column = 4, 17, 9
    lps = LPS_AFFINE @ [slice_, row, column, 1]
    ras = lps_to_ras_affine(LPS_AFFINE) @ [column, row, slice_, 1]
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]])
    assert voxel_spacing(LPS_AFFINE) == pytest.approx((2.5, 0.7, 0.8))


def test_written_volume_reads_back_with_its_voxels_and_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, size=(5, 6, 7), dtype=np.uint8)
    path = tmp_path / "labels.nii.gz"
    write_nifti(path, labels, LPS_AFFINE)

    array, affine = read_nifti(path)
    assert array.dtype == np.uint8 and array.flags.c_contiguous
    np.testing.assert_array_equal(array, labels)
    np.testing.assert_allclose(affine, LPS_AFFINE, atol=1e-5)
    np.testing.assert_array_equal(read_label_map(path), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


def test_the_file_is_ras_column_row_slice_in_scanner_space_and_mm(tmp_path: Path) -> None:
    labels = np.zeros((5, 6, 7), np.uint8)
    path = tmp_path / "labels.nii.gz"
    write_nifti(path, labels, LPS_AFFINE)
    image = nib.nifti1.load(path)  # type: ignore[no-untyped-call]
    assert image.shape == (7, 6, 5)
    np.testing.assert_allclose(image.affine, lps_to_ras_affine(LPS_AFFINE), atol=1e-5)
    np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)
    assert int(image.header["sform_code"]) == int(image.header["qform_code"]) == 1
    assert image.header.get_xyzt_units()[0] == "mm"


def test_bytes_read_like_the_file_gzip_or_not(tmp_path: Path) -> None:
    hu = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) - 1000
    write_nifti(tmp_path / "image.nii.gz", hu, LPS_AFFINE)
    write_nifti(tmp_path / "image.nii", hu, LPS_AFFINE)
    for name in ("image.nii.gz", "image.nii"):
        array, affine = read_nifti((tmp_path / name).read_bytes(), dtype=np.float32)
        np.testing.assert_array_equal(array, hu)
        np.testing.assert_allclose(affine, LPS_AFFINE, atol=1e-5)


def test_a_trailing_axis_of_one_is_dropped_and_other_shapes_are_refused() -> None:
    affine = lps_to_ras_affine(LPS_AFFINE)
    four_d = nib.Nifti1Image(np.ones((7, 6, 5, 1), np.uint8), affine)  # type: ignore[no-untyped-call]
    array, _ = read_nifti(bytes(four_d.to_bytes()))
    assert array.shape == (5, 6, 7)
    series = nib.Nifti1Image(np.ones((7, 6, 5, 2), np.uint8), affine)  # type: ignore[no-untyped-call]
    with pytest.raises(NotAVolume, match="4-D"):
        read_nifti(bytes(series.to_bytes()))
