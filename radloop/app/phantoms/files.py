"""A phantom study on disk: `write_study` writes the CT as DICOM (one slice per file), the
ground-truth labels as NIfTI and a `truth.json` sidecar tying the DICOM UIDs to the truth.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from agents.nifti import write_nifti
from radloop.app.phantoms.anatomy import Phantom, PhantomLabel
from radloop.app.phantoms.ct import CtSeriesHeader, write_ct_slice
from radloop.app.phantoms.render import generate

SERIES_DESCRIPTION = "PHANTOM ABDOMEN CT"


@dataclass(frozen=True)
class WrittenStudy:
    """Where one phantom study went on disk, and the UIDs that tie DICOM to its truth."""

    index: int
    seed: int
    study_uid: str
    series_uid: str
    slices: int
    dicom_dir: Path
    truth: Path
    truth_json: Path

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (the `radloop demo data --json` row)."""
        return {
            "index": self.index,
            "seed": self.seed,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "slices": self.slices,
            "dicom_dir": str(self.dicom_dir),
            "truth": str(self.truth),
        }


def write_study(
    root: Path,
    index: int,
    seed: int | None = None,
    acquired: datetime | None = None,
    *,
    pool: bool = False,
) -> WrittenStudy:
    """Generate phantom `seed` (default: `index`) and write it under `root/<index:04d>/`.

    Writes `dicom/slice0000.dcm ...` (one CT slice per file, in position order),
    `truth.nii.gz` (uint8 labels, axes column/row/slice, RAS affine of the phantom's grid) and
    `truth.json` (with `subpopulation`: "common" unless `pool` drew another; `pool` makes
    the study a member of the heterogeneous pool). UIDs are new on every call; `.dcm` files
    left by an earlier run are removed so the folder only ever holds one series.
    """
    seed = index if seed is None else seed
    phantom = generate(seed, pool=pool)
    folder = root / f"{index:04d}"
    dicom_dir = folder / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    for stale in dicom_dir.glob("*.dcm"):
        stale.unlink()
    dz, dy, dx = phantom.spacing
    header = CtSeriesHeader(
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        pixel_spacing=(dy, dx),
        slice_thickness=dz,
        description=SERIES_DESCRIPTION,
        patient_name=f"PHANTOM^{seed:04d}",
        patient_id=f"PHANTOM-{seed:04d}",
        body_part="ABDOMEN",
        acquired=acquired or datetime.now(UTC),
    )
    for k in range(phantom.hu.shape[0]):
        path = dicom_dir / f"slice{k:04d}.dcm"
        write_ct_slice(path, phantom.hu[k], header, k, phantom.position(k, 0, 0))

    truth = _save_mask(phantom, folder / "truth.nii.gz")
    truth_json = folder / "truth.json"
    truth_json.write_text(json.dumps(_truth_record(phantom, header, index), indent=2) + "\n")
    return WrittenStudy(
        index=index,
        seed=seed,
        study_uid=header.study_uid,
        series_uid=header.series_uid,
        slices=phantom.hu.shape[0],
        dicom_dir=dicom_dir,
        truth=truth,
        truth_json=truth_json,
    )


def _save_mask(phantom: Phantom, path: Path) -> Path:
    """Labels as NIfTI on the phantom's grid (agents.nifti: RAS, scanner-space q/s-forms)."""
    write_nifti(path, phantom.labels, phantom.affine())
    return path


def _truth_record(phantom: Phantom, header: CtSeriesHeader, index: int) -> dict[str, Any]:
    voxel_ml = math.prod(phantom.spacing) / 1000
    return {
        "study_uid": header.study_uid,
        "series_uid": header.series_uid,
        "frame_of_reference_uid": header.frame_of_reference_uid,
        "index": index,
        "seed": phantom.seed,
        "subpopulation": phantom.parameters.subpopulation,
        "labels": {label.name.lower(): label.value for label in PhantomLabel},
        "volumes_ml": {
            label.name.lower(): round(float((phantom.labels == label).sum()) * voxel_ml, 1)
            for label in PhantomLabel
        },
        "shape": list(phantom.hu.shape),
        "axes": ["slice", "row", "column"],
        "spacing": list(phantom.spacing),
        "origin_lps": list(phantom.origin),
        "nifti": {
            "file": "truth.nii.gz",
            "axes": ["column", "row", "slice"],
            "space": "RAS (x and y of DICOM LPS negated)",
        },
        "parameters": asdict(phantom.parameters),
    }
