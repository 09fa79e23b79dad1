"""Phantom CT studies: DICOM that reads back as generated, truth that lines up with it."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from radloop.app.phantoms import Phantom, PhantomLabel, generate, write_study
from tests.servers import RADLOOP


def _read_series(folder: Path) -> list[Dataset]:
    """Every slice in `folder`, read in a shuffled order then sorted by position along z."""
    paths = sorted(folder.glob("*.dcm"))
    random.Random(0).shuffle(paths)
    return sorted(
        (dcmread(path) for path in paths), key=lambda ds: float(ds.ImagePositionPatient[2])
    )


def _dicom_position(ds: Dataset, row: int, column: int) -> NDArray[np.float64]:
    """Patient position (LPS mm) of a pixel, from the slice's own geometry (PS3.3 C.7.6.2.1.1)."""
    origin = np.array(ds.ImagePositionPatient, dtype=np.float64)
    along_row = np.array(ds.ImageOrientationPatient[:3], dtype=np.float64)
    along_column = np.array(ds.ImageOrientationPatient[3:], dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    position: NDArray[np.float64] = (
        origin + along_row * column_spacing * column + along_column * row_spacing * row
    )
    return position


def _mean_hu(phantom: Phantom, label: PhantomLabel) -> tuple[float, float]:
    """Mean HU inside `label` and its standard error."""
    values = phantom.hu[phantom.labels == label].astype(np.float64)
    return float(values.mean()), float(values.std() / np.sqrt(values.size))


def test_dicom_slices_read_back_as_the_generated_hu_volume_in_position_order(
    tmp_path: Path,
) -> None:
    study = write_study(tmp_path, 3, seed=11)
    phantom = generate(11)
    series = _read_series(study.dicom_dir)

    assert len(series) == study.slices == phantom.hu.shape[0]
    volume = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in series]
    )
    np.testing.assert_array_equal(volume, phantom.hu.astype(np.float64))
    assert [int(ds.InstanceNumber) for ds in series] == list(range(1, len(series) + 1))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in series])
    np.testing.assert_allclose(np.diff(z), float(series[0].SliceThickness))
    assert {ds.SeriesInstanceUID for ds in series} == {study.series_uid}
    assert {ds.FrameOfReferenceUID for ds in series} == {series[0].FrameOfReferenceUID}
    assert series[0].SeriesDescription == "PHANTOM ABDOMEN CT"


def test_nifti_affine_maps_labelled_voxels_to_the_dicom_patient_position(tmp_path: Path) -> None:
    study = write_study(tmp_path, 0, seed=5)
    phantom = generate(5)
    series = _read_series(study.dicom_dir)
    image = nib.load(study.truth)
    assert isinstance(image, nib.Nifti1Image)
    mask = np.asarray(image.dataobj)
    assert mask.dtype == np.uint8
    assert mask.shape == phantom.labels.shape[::-1]  # (column, row, slice)
    axes = nib.aff2axcodes(image.affine)  # type: ignore[no-untyped-call]
    assert axes == ("L", "P", "S")

    rng = np.random.default_rng(0)
    for label in PhantomLabel:
        columns, rows, slices = np.nonzero(mask == label)
        for pick in rng.choice(columns.size, size=3, replace=False):
            i, j, k = int(columns[pick]), int(rows[pick]), int(slices[pick])
            assert phantom.labels[k, j, i] == label
            x, y, z, _ = image.affine @ np.array([i, j, k, 1.0])
            lps = np.array([-x, -y, z])  # NIfTI world is RAS; DICOM patient space is LPS
            np.testing.assert_allclose(lps, _dicom_position(series[k], j, i), atol=1e-3)


def test_same_seed_gives_identical_phantom_and_other_seeds_move_and_resize_organs() -> None:
    first, again, other = generate(7), generate(7), generate(8)

    np.testing.assert_array_equal(first.hu, again.hu)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert first.parameters == again.parameters
    assert first.parameters != other.parameters
    for label in PhantomLabel:
        ml_first = (first.labels == label).sum() * np.prod(first.spacing)
        ml_other = (other.labels == label).sum() * np.prod(other.spacing)
        assert ml_first != pytest.approx(ml_other, rel=0.02)
        centre_first = np.argwhere(first.labels == label).mean(axis=0) * first.spacing
        centre_other = np.argwhere(other.labels == label).mean(axis=0) * other.spacing
        assert np.linalg.norm(centre_first - centre_other) > 2.0  # mm


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_each_organ_is_present_with_a_plausible_volume_on_its_own_side(seed: int) -> None:
    phantom = generate(seed)
    voxel_ml = float(np.prod(phantom.spacing)) / 1000
    plausible_ml = {
        PhantomLabel.LIVER: (400, 2500),
        PhantomLabel.SPLEEN: (50, 600),
        PhantomLabel.KIDNEY: (50, 700),  # both kidneys, either may be cut by the scan range
    }
    for label, (low, high) in plausible_ml.items():
        assert low < (phantom.labels == label).sum() * voxel_ml < high, label.name

    def columns(label: PhantomLabel) -> NDArray[np.intp]:
        return np.nonzero(phantom.labels == label)[2]

    middle = phantom.hu.shape[2] / 2
    # Columns run to the patient's left: the liver (patient right) is on the image left.
    assert np.median(columns(PhantomLabel.LIVER)) < middle < np.median(columns(PhantomLabel.SPLEEN))
    kidney_columns = columns(PhantomLabel.KIDNEY)
    assert (kidney_columns < middle).any() and (kidney_columns > middle).any()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_organ_mean_hu_differ_from_each_other_beyond_noise(seed: int) -> None:
    phantom = generate(seed)
    means = {label: _mean_hu(phantom, label) for label in PhantomLabel}

    assert means[PhantomLabel.SPLEEN][0] < means[PhantomLabel.LIVER][0]
    assert means[PhantomLabel.LIVER][0] < means[PhantomLabel.KIDNEY][0]
    for first in PhantomLabel:
        for second in PhantomLabel:
            if first < second:
                (mean_a, error_a), (mean_b, error_b) = means[first], means[second]
                assert abs(mean_a - mean_b) > max(5.0, 10 * np.hypot(error_a, error_b))


def test_demo_data_cli_writes_two_sendable_studies_without_real_patient_data(
    radloop_env: dict[str, str], tmp_path: Path
) -> None:
    result = subprocess.run(
        [RADLOOP, "demo", "data", "--studies", "2", "--json"],
        env=radloop_env,
        capture_output=True,
        text=True,
        check=True,
    )
    studies = json.loads(result.stdout)

    assert len(studies) == 2
    assert len({study["study_uid"] for study in studies}) == 2
    root = Path(radloop_env["RADLOOP_DATA_DIR"]) / "demo" / "phantoms"
    for study in studies:
        dicom_dir = Path(study["dicom_dir"])
        assert dicom_dir.is_relative_to(root)
        assert Path(study["truth"]).is_file()
        truth = json.loads((Path(study["truth"]).parent / "truth.json").read_text())
        assert truth["study_uid"] == study["study_uid"]
        assert truth["series_uid"] == study["series_uid"]
        assert truth["labels"] == {"liver": 1, "spleen": 2, "kidney": 3}
        paths = sorted(dicom_dir.glob("*.dcm"))
        assert len(paths) == study["slices"] == truth["shape"][0]
        for path in paths:
            ds = dcmread(path)  # no force: a valid Part 10 file, as storescu needs
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.StudyInstanceUID == study["study_uid"]
            assert str(ds.PatientName).startswith("PHANTOM^")
            assert str(ds.PatientID).startswith("PHANTOM-")
            for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName"):
                assert not ds.get(keyword), keyword
            for keyword in ("InstitutionName", "OtherPatientIDs", "PatientAddress"):
                assert keyword not in ds, keyword
