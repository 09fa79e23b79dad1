"""The seed corpus of the fuzz tests and harnesses: radloop's own files and pydicom-data's."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agents.drafts import write_draft
from agents.nifti import nrrd_label_bytes
from agents.volume import LoadedSeries, load_series
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from tests.dicom_files import generated_ct, real_file

REAL_SEEDS = ["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm", "liver.dcm"]


@dataclass
class Corpus:
    slices: list[bytes]  # one generated CT series, in order
    instances: list[bytes]  # those slices and the real files
    series: LoadedSeries
    spec: ModelSpec
    labels: list[bytes]  # the series' label as SEG, NIfTI, NIfTI.gz, NRRD, gzip NRRD


def build_corpus(folder: Path) -> Corpus:
    """Seeds written under `folder`: a 4-slice 16x16 CT series, its label as radloop writes it
    (SEG and NIfTI by `write_draft`, NRRD by `nrrd_label_bytes`), and pydicom-data files."""
    paths = generated_ct(folder / "ct", 4, size=16)
    slices = [path.read_bytes() for path in paths]
    series = load_series(paths)
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    label_map = np.zeros(series.array.shape, dtype=np.uint8)
    label_map[1:3, 2:8, 2:8] = 1
    label_map[2:4, 9:14, 9:14] = 2
    files = write_draft(series, label_map, spec, "1", folder / "draft")
    nifti = gzip.decompress(files.nifti_path.read_bytes())
    nrrd_bytes = nrrd_label_bytes(label_map, series.affine)
    nrrd_header, voxels = nrrd_bytes.split(b"\n\n", 1)
    nrrd_gzip = nrrd_header.replace(b"encoding: raw", b"encoding: gzip") + b"\n\n"
    labels = [
        files.seg_path.read_bytes(),
        nifti,
        gzip.compress(nifti),
        nrrd_bytes,
        nrrd_gzip + gzip.compress(voxels),
    ]
    instances = slices + [real_file(name).read_bytes() for name in REAL_SEEDS]
    return Corpus(slices, instances, series, spec, labels)
