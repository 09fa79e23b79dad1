"""Draft segmentations as files a viewer and a trainer can use: DICOM SEG (highdicom) + NIfTI.

The SEG references the source series and its frame of reference, carries one segment per spec
label with its coded concepts, and says who made it: SegmentAlgorithmType AUTOMATIC with the
model's name and version. The NIfTI copy has the same voxels (`agents.nifti`). Both files are
written durably (`radloop.durable`); `agents.segmentation` reads a SEG back as a label map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from agents.nifti import write_nifti
from agents.volume import LoadedSeries
from radloop.durable import durable_path
from radloop.modelspec import Code, ModelSpec

log = logging.getLogger(__name__)

DRAFT_SERIES_NUMBER = 9901
CORRECTION_SERIES_NUMBER = 9902
# Type 2 attributes of the Patient and General Study modules that highdicom copies from the
# source into the SEG. DICOM lets a source send them empty or leave them out (exported and
# de-identified data often do); the SEG then carries them empty.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# PatientSex's defined terms (PS3.3 C.7.1.1); highdicom refuses any other value.
_PATIENT_SEX_TERMS = {"M", "F", "O", ""}


@dataclass(frozen=True)
class DraftFiles:
    seg_path: Path
    nifti_path: Path
    seg_sop_instance_uid: str
    seg_series_uid: str


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.code, scheme_designator=code.scheme, meaning=code.meaning)


def segment_descriptions(
    spec: ModelSpec, model_version: str | None
) -> list[hd.seg.SegmentDescription]:
    """One per spec label: AUTOMATIC by the model's version, or MANUAL when `model_version` is
    None (a reader's label)."""
    algorithm = (
        hd.AlgorithmIdentificationSequence(
            name=spec.name, family=codes.cid7162.ArtificialIntelligence, version=model_version
        )
        if model_version is not None
        else None
    )
    kind = hd.seg.SegmentAlgorithmTypeValues
    return [
        hd.seg.SegmentDescription(
            segment_number=label.value,
            segment_label=label.name,
            segmented_property_category=_concept(label.category),
            segmented_property_type=_concept(label.type),
            algorithm_type=kind.AUTOMATIC if algorithm is not None else kind.MANUAL,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*label.color) if label.color else None,
        )
        for label in spec.labels
    ]


def _with_type2_attributes(sources: list[Dataset]) -> list[Dataset]:
    """`sources`, with each Type 2 attribute the SEG copies present (empty when the source left
    it out, or held a PatientSex outside the defined terms). The loaded series stays as read."""
    fixed = []
    for ds in sources:
        missing = [keyword for keyword in _TYPE2_COPIED if keyword not in ds]
        bad_sex = str(ds.get("PatientSex", "") or "").strip().upper() not in _PATIENT_SEX_TERMS
        if missing or bad_sex:
            copied = Dataset()
            copied.update(ds)  # a new element dict: `ds` keeps its own
            if "file_meta" in ds.__dict__:
                copied.file_meta = ds.file_meta
            if bad_sex:
                del copied.PatientSex  # a fresh element, not the shared one, is set below
                missing.append("PatientSex")
            for keyword in missing:
                setattr(copied, keyword, None)
            ds = copied
        fixed.append(ds)
    return fixed


def remove_cut_attempts(folder: Path, keep: set[Path]) -> None:
    """Delete from `folder` the files of earlier attempts at what just committed there (a draft,
    a correction), left when their transaction was cut or refused: PostgreSQL killed at COMMIT,
    the process killed, a lease lapsed meanwhile. Nothing references them: one attempt per
    folder commits (the draft key; the case's holder, once). Temporary files (a leading dot)
    are left to the racing attempt writing them: a draft's loser removes its own files; a
    correction refused after this one committed (two saves of one case at once) leaves its
    own, which nothing removes yet."""
    for path in folder.iterdir():
        if path not in keep and not path.name.startswith("."):
            log.warning("removing %s, left by a cut attempt", path.name)
            path.unlink(missing_ok=True)


def write_draft(
    series: LoadedSeries,
    label_map: NDArray[Any],
    spec: ModelSpec,
    model_version: str,
    out_dir: Path,
    *,
    reader: str | None = None,
) -> DraftFiles:
    """Write `label_map` (same shape as `series.array`, values 0..len(labels)) as SEG + NIfTI.

    The files are named after the SEG's SOP Instance UID under `out_dir`. With `reader`, the
    SEG is that reader's MANUAL label (a correction uploaded as NIfTI), not the model's draft.
    """
    if label_map.shape != series.array.shape:
        raise ValueError(f"label map {label_map.shape} does not match series {series.array.shape}")
    labels = label_map.astype(np.uint8)
    if int(labels.max(initial=0)) > len(spec.labels):
        raise ValueError("label map holds values the spec does not define")
    seg_uid, seg_series_uid = generate_uid(), generate_uid()
    if len(series.source) == 1 and len(series.source_frames) > 1:
        # Multi-frame source: SEG frames follow the source's frame order.
        order = np.argsort(np.asarray(series.source_frames))
        pixels = labels[order]
    else:
        pixels = labels
    seg = hd.seg.Segmentation(
        source_images=_with_type2_attributes(series.source),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(spec, None if reader else model_version),
        series_instance_uid=seg_series_uid,
        series_number=CORRECTION_SERIES_NUMBER if reader else DRAFT_SERIES_NUMBER,
        sop_instance_uid=seg_uid,
        instance_number=1,
        manufacturer="radloop",
        manufacturer_model_name=spec.name,
        software_versions=f"radloop {package_version('radloop')}; model {model_version}",
        device_serial_number="radloop",
        series_description=(
            f"radloop correction {spec.name}"
            if reader
            else f"radloop draft {spec.name} v{model_version}"
        )[:64],
        content_creator_name=f"{reader}^" if reader else None,
        omit_empty_frames=True,
    )
    seg_path = out_dir / f"{seg_uid}.dcm"
    with durable_path(seg_path) as temporary:
        seg.save_as(temporary)
    nifti_path = out_dir / f"{seg_uid}.nii.gz"
    write_nifti(nifti_path, labels, series.affine)
    return DraftFiles(seg_path, nifti_path, str(seg_uid), str(seg_series_uid))
