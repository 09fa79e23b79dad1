"""Volume loading from the spool: order along the normal, rescale, geometry, and refusals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEGLosslessSV1, generate_uid

from agents.volume import LoadedSeries, SeriesRejected, load_series, series_files
from dicom_listener import Ingestor, InstanceHeader
from radloop.db import Store
from radloop.domain import IngestSource
from radloop.settings import Settings
from tests.dicom_files import (
    ENHANCED_MR_FILES,
    ENHANCED_MR_ORIENTATION,
    ENHANCED_MR_ORIGIN,
    enhanced_ct,
    enhanced_mr_with_planes,
    generated_ct,
    real_dataset,
    real_file,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Rows run 30° off the x axis, columns run feet-ward: the slice normal is oblique in x/y.
OBLIQUE = (round(math.cos(math.pi / 6), 6), 0.5, 0.0, 0.0, 0.0, -1.0)
ORIGIN = (-10.0, 20.0, 30.0)
STEP = 2.5  # mm between slots along the normal
PIXEL = 0.8  # generated_ct's pixel spacing


def _edit(path: Path, target: Path | None = None, **attributes: object) -> Path:
    """Rewrite `path` with `attributes` set, moved to `target` when given."""
    ds = dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    out = target or path
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    if out != path:
        path.unlink()
    return out


def _place(
    paths: list[Path],
    slots: Sequence[float],
    orientation: tuple[float, ...] = AXIAL,
    tilt_mm: float = 0.0,
) -> None:
    """Put file i at `slots[i]` steps along the normal of `orientation`; `tilt_mm` shifts each
    slot down the columns as a tilted gantry would."""
    cosines = np.array(orientation)
    normal = np.cross(cosines[:3], cosines[3:])
    for path, slot in zip(paths, slots, strict=True):
        position = np.array(ORIGIN) + slot * STEP * normal + slot * tilt_mm * cosines[3:]
        _edit(
            path,
            ImagePositionPatient=[round(float(v), 4) for v in position],
            ImageOrientationPatient=list(orientation),
        )


def _series(tmp_path: Path, slices: int = 6, **kwargs: object) -> list[Path]:
    return generated_ct(tmp_path / "series", slices, size=16, **kwargs)


def _stored(path: Path) -> npt.NDArray[np.float32]:
    return dcmread(path).pixel_array.astype(np.float32)


def _rejection(paths: list[Path], **kwargs: int) -> str:
    with pytest.raises(SeriesRejected) as caught:
        load_series(paths, **kwargs)
    return str(caught.value)


def _voxel_to_patient(loaded: LoadedSeries, k: int, i: int, j: int) -> npt.NDArray[np.float64]:
    position: npt.NDArray[np.float64] = (loaded.affine @ np.array([k, i, j, 1.0]))[:3]
    return position


def test_slices_follow_position_along_normal_not_file_name_or_instance_number(
    tmp_path: Path,
) -> None:
    paths = _series(tmp_path, slices=8)
    rng = np.random.default_rng(7)
    slots = [int(s) for s in rng.permutation(8)]
    _place(paths, slots, orientation=OBLIQUE)
    # Names and InstanceNumbers shuffled independently of the positions, files passed in a
    # third order.
    numbers = [int(n) + 1 for n in rng.permutation(8)]
    names = [f"{n:02d}.dcm" for n in rng.permutation(8)]
    shuffled = [
        _edit(path, tmp_path / "shuffled" / names[n], InstanceNumber=numbers[n])
        for n, path in enumerate(paths)
    ]
    by_slot = [shuffled[slots.index(k)] for k in range(8)]
    order = rng.permutation(8)

    loaded = load_series([shuffled[n] for n in order])

    assert np.array_equal(loaded.array, np.stack([_stored(path) for path in by_slot]))
    assert loaded.array.dtype == np.float32
    assert loaded.spacing == pytest.approx((STEP, PIXEL, PIXEL), abs=1e-4)
    assert [ds.SOPInstanceUID for ds in loaded.source] == [
        dcmread(path).SOPInstanceUID for path in by_slot
    ]
    assert loaded.source_frames == [1] * 8
    assert all("PixelData" not in ds for ds in loaded.source)
    row, column = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    for k, i, j in ((0, 0, 0), (5, 3, 11), (7, 15, 2)):
        expected = (
            np.array(dcmread(by_slot[k]).ImagePositionPatient, dtype=float)
            + i * PIXEL * column
            + j * PIXEL * row
        )
        assert _voxel_to_patient(loaded, k, i, j) == pytest.approx(expected, abs=1e-3)
    normal = np.cross(row, column)
    first, last = (_voxel_to_patient(loaded, k, 0, 0) @ normal for k in (0, 7))
    assert last - first == pytest.approx(7 * STEP, abs=1e-3)


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=3)
    hu = [_stored(path) for path in paths]
    for path, values in zip(paths, hu, strict=True):
        stored = ((values + 2048) * 2).astype(np.uint16)
        _edit(
            path,
            PixelRepresentation=0,
            RescaleIntercept=-2048,
            RescaleSlope=0.5,
            PixelData=stored.tobytes(),
        )

    loaded = load_series(paths)

    assert np.array_equal(loaded.array, np.stack(hu))
    assert loaded.array.min() < -900


def test_spacing_jitter_within_tolerance_is_accepted(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=5)
    _place(paths, [0, 1.004, 1.996, 3.002, 4])  # at most 0.01 mm off the regular grid

    assert load_series(paths).spacing[0] == pytest.approx(STEP, abs=0.01)


def test_mixed_orientations_are_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    _edit(paths[2], ImageOrientationPatient=[1, 0, 0, 0, 0.9998, 0.02])

    assert _rejection(paths).startswith("mixed orientations")


def test_duplicate_position_is_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    _place(paths, [0, 1, 2, 2, 3, 4])

    assert _rejection(paths).startswith("duplicate positions")


def test_missing_slice_is_rejected_as_gap(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    _place(paths, [0, 1, 2, 4, 5, 6])

    assert _rejection(paths).startswith("gap")


def test_non_uniform_spacing_is_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    _place(paths, [0, 1, 2, 3.5, 4.5, 5.5])

    assert _rejection(paths).startswith("non-uniform slice spacing")


def test_gantry_tilted_stack_is_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    _place(paths, [0, 1, 2, 3, 4, 5], tilt_mm=0.5)  # about 11°

    assert "not stacked along the slice normal" in _rejection(paths)


def test_fewer_slices_than_minimum_are_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=3)

    assert _rejection(paths, min_slices=4) == "too few slices: 3, the minimum is 4"


def test_two_series_mixed_are_rejected(tmp_path: Path) -> None:
    first = _series(tmp_path, slices=3)
    study_uid = str(dcmread(first[0]).StudyInstanceUID)
    second = generated_ct(tmp_path / "other", 3, size=16, study_uid=study_uid)

    assert _rejection(first + second) == "files belong to 2 series"


def test_two_studies_mixed_are_rejected(tmp_path: Path) -> None:
    first = _series(tmp_path, slices=3)
    second = generated_ct(tmp_path / "other", 3, size=16)

    assert _rejection(first + second) == "files belong to 2 studies"


def test_file_without_pixel_data_is_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=3)
    ds = dcmread(paths[1])
    del ds.PixelData
    ds.save_as(paths[1], enforce_file_format=True)

    assert _rejection(paths) == "file 2 of 3 is not an image (no pixel data)"


def test_segmentation_instance_is_rejected_as_not_an_image() -> None:
    assert _rejection([real_file("liver.dcm")]) == "file 1 of 1 is a segmentation, not an image"


def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=2)
    paths[0].write_bytes(b"not a DICOM file")

    assert _rejection(paths).startswith("file 1 of 2 is unreadable")


def test_slice_without_position_is_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=3)
    ds = dcmread(paths[0])
    del ds.ImagePositionPatient
    ds.save_as(paths[0], enforce_file_format=True)

    assert _rejection(paths) == "missing ImagePositionPatient"


def test_slices_of_different_sizes_are_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=3)
    first = dcmread(paths[0])
    (other,) = generated_ct(
        tmp_path / "bigger",
        1,
        size=20,
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
    )
    _edit(other, FrameOfReferenceUID=first.FrameOfReferenceUID)
    _place([*paths, other], [0, 1, 2, 3])

    assert _rejection([*paths, other]) == "slices differ in rows or columns"


def test_slices_with_different_pixel_spacing_are_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=3)
    _edit(paths[1], PixelSpacing=[0.7, 0.7])

    assert _rejection(paths) == "slices differ in pixel spacing"


def test_undecodable_pixel_data_is_rejected(tmp_path: Path) -> None:
    paths = _series(tmp_path, slices=3)
    ds = dcmread(paths[1])
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3 not a JPEG stream"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(paths[1], enforce_file_format=True)

    # Rejected either way: no decoder installed for it, or the decoder refuses the stream.
    assert _rejection(paths).startswith("cannot decode pixel data: ")


def test_enhanced_ct_loads_like_the_slices_it_was_converted_from(tmp_path: Path) -> None:
    enhanced, slices = enhanced_ct(tmp_path, 6)

    multiframe = load_series([enhanced])
    single = load_series(slices)

    assert multiframe.array.shape == (6, 32, 32)
    assert np.array_equal(multiframe.array, single.array)
    assert np.allclose(multiframe.affine, single.affine)
    assert multiframe.spacing == pytest.approx(single.spacing)
    frames = dcmread(enhanced, stop_before_pixels=True).PerFrameFunctionalGroupsSequence
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in frames]
    assert multiframe.source_frames == [int(n) + 1 for n in np.argsort(z)]
    assert len(multiframe.source) == 1 and "PixelData" not in multiframe.source[0]


@pytest.mark.parametrize("name", ENHANCED_MR_FILES)
def test_enhanced_mr_frames_are_placed_by_their_plane_positions(name: str, tmp_path: Path) -> None:
    syntax = real_dataset(name).file_meta.TransferSyntaxUID
    if syntax.is_compressed and not get_decoder(syntax).is_available:
        pytest.skip(f"no pydicom decoder installed for {syntax.name}")
    slots = [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]
    path = enhanced_mr_with_planes(name, tmp_path / "emri.dcm", slots)

    loaded = load_series([path], min_slices=10)

    reference = real_dataset("emri_small.dcm").pixel_array.astype(np.float32)
    assert loaded.array.shape == (10, 64, 64)
    assert np.array_equal(loaded.array, reference[[slots.index(k) for k in range(10)]])
    assert loaded.source_frames == [slots.index(k) + 1 for k in range(10)]
    assert loaded.spacing == pytest.approx((1.2, 0.9, 0.8))
    row, column = np.array(ENHANCED_MR_ORIENTATION[:3]), np.array(ENHANCED_MR_ORIENTATION[3:])
    normal = np.cross(row, column)
    expected = np.array(ENHANCED_MR_ORIGIN) + 9 * 1.2 * normal + 5 * 0.9 * column + 7 * 0.8 * row
    assert _voxel_to_patient(loaded, 9, 5, 7) == pytest.approx(expected, abs=1e-3)


def test_enhanced_mr_without_plane_geometry_is_rejected() -> None:
    reason = _rejection([real_file("emri_small.dcm")])

    assert reason == "missing ImagePositionPatient in the functional groups"


def test_enhanced_ct_frames_follow_the_normal_not_frame_numbers() -> None:
    # eCT_Supplemental: frame 1 at z=-159, frame 2 at z=-149, rows run towards -x so the
    # normal points feet-ward; stored 0 with intercept -1024 (its real-world map is ignored).
    loaded = load_series([real_file("eCT_Supplemental.dcm")])

    stored = real_dataset("eCT_Supplemental.dcm").pixel_array.astype(np.float32)
    assert loaded.source_frames == [2, 1]
    assert np.array_equal(loaded.array, stored[::-1] - 1024)
    assert loaded.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert _voxel_to_patient(loaded, 1, 0, 0) == pytest.approx([99.5, -301.5, -159.0])


def test_series_files_are_the_spooled_instances_of_the_series(
    store: Store, settings: Settings, tmp_path: Path
) -> None:
    ingestor = Ingestor(store, settings.spool_dir)
    paths = generated_ct(tmp_path / "ct", 4)
    for path in paths:
        ds = dcmread(path)
        header = InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
        ingestor.ingest(header, path.read_bytes(), IngestSource.DIMSE)
    series_uid = str(dcmread(paths[0]).SeriesInstanceUID)

    files = series_files(store, settings.spool_dir, series_uid)

    assert {dcmread(f).SOPInstanceUID for f in files} == {dcmread(p).SOPInstanceUID for p in paths}
    assert all(f.is_relative_to(settings.spool_dir) for f in files)
    assert load_series(files).array.shape == (4, 64, 64)
    assert series_files(store, settings.spool_dir, generate_uid()) == []
