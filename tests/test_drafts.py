"""Draft SEG + NIfTI: what a viewer reads back is what the model produced, with provenance."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from agents.drafts import write_draft
from agents.segmentation import label_map_from_seg
from agents.volume import load_series
from radloop.app.phantoms import write_study
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec


def _nifti(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")


def test_seg_reads_back_as_the_label_map_with_coded_segments_and_provenance(
    spec: ModelSpec, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "phantoms", 0, seed=3)
    series = load_series(sorted(study.dicom_dir.glob("*.dcm")))
    truth = _nifti(study.truth).get_fdata().astype(np.uint8).transpose(2, 1, 0)
    assert truth.shape == series.array.shape

    files = write_draft(series, truth, spec, "7", tmp_path / "drafts")

    assert np.array_equal(label_map_from_seg(dcmread(files.seg_path), series), truth)
    seg = dcmread(files.seg_path)
    assert seg.SOPInstanceUID == files.seg_sop_instance_uid
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    assert seg.StudyInstanceUID == series.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["Liver", "Spleen", "Kidney"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in segments] == [
        "10200004",
        "78961009",
        "64033007",
    ]
    for segment in segments:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("phantom-abdomen", "7")
    assert "PHANTOM" not in str(seg.get("ContentCreatorName", ""))


def test_nifti_copy_has_the_same_voxels_in_the_same_place(spec: ModelSpec, tmp_path: Path) -> None:
    study = write_study(tmp_path / "phantoms", 0, seed=4)
    series = load_series(sorted(study.dicom_dir.glob("*.dcm")))
    truth = _nifti(study.truth).get_fdata().astype(np.uint8).transpose(2, 1, 0)

    files = write_draft(series, truth, spec, "1", tmp_path / "drafts")

    draft = _nifti(files.nifti_path)
    assert np.array_equal(np.asarray(draft.dataobj).transpose(2, 1, 0), truth)
    # The same voxel lands at the same RAS point as the ground truth radloop generated.
    np.testing.assert_allclose(draft.affine, _nifti(study.truth).affine, atol=1e-3)


def test_label_map_of_the_wrong_shape_is_refused(spec: ModelSpec, tmp_path: Path) -> None:
    study = write_study(tmp_path / "phantoms", 0, seed=5)
    series = load_series(sorted(study.dicom_dir.glob("*.dcm")))
    with pytest.raises(ValueError, match="does not match"):
        write_draft(series, np.zeros((2, 2, 2), np.uint8), spec, "1", tmp_path / "drafts")
