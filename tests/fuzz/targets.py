"""What each fuzzed input goes through, as the product handles it; shared by the hypothesis
properties (tests/test_fuzz_inputs.py) and the atheris harness (tests/fuzz/harness.py).

Each returns the outcome in a few words (for statistics) when the input ended in an answer
radloop gives on purpose, and lets any other exception through: that is the finding.
"""

from __future__ import annotations

import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread

from agents.review.corrections import (
    InvalidLabel,
    is_dicom,
    is_label_volume,
    read_dicom,
    seg_label_map,
    volume_label_map,
)
from agents.volume import SeriesRejected, load_series
from dicom_listener.instance import InstanceHeader, InvalidInstance
from tests.fuzz.corpus import Corpus


def gist(error: Exception) -> str:
    """A refusal's reason without its numbers; a refusal must give one."""
    words = str(error).replace(":", " ").split()[:4]
    assert words, "a refusal without a reason"
    return " ".join(w for w in words if not any(c.isdigit() for c in w))


def receive_instance(content: bytes) -> str:
    """What the listener and the watch folder do with a file: pydicom decodes it (else the
    instance is refused as undecodable: 0xC000, or a `rejected/` file), then `InstanceHeader`
    takes it or says why not."""
    try:
        ds = dcmread(BytesIO(content))
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception:
        return "pydicom cannot read it"
    try:
        header = InstanceHeader.from_dataset(ds, transfer_syntax)
    except InvalidInstance as refused:
        return f"refused: {gist(refused)}"
    assert header.sop_instance_uid and header.study_uid
    return "taken"


def load_files(files: list[bytes], folder: Path) -> str:
    """What the annotator does with a completed series of these files: a volume, or
    `SeriesRejected` (the study is rejected with the reason, not retried)."""
    where = Path(tempfile.mkdtemp(dir=folder))
    paths = []
    for index, content in enumerate(files):
        paths.append(where / f"{index}.dcm")
        paths[-1].write_bytes(content)
    try:
        series = load_series(paths)
    except SeriesRejected as rejected:
        return f"rejected: {gist(rejected)}"
    assert series.array.ndim == 3 and series.affine.shape == (4, 4)
    return "loaded"


def upload_label(content: bytes, corpus: Corpus) -> str:
    """What `PUT /api/annotations/{id}/label` and MONAI Label's `/datastore/label` do with a
    body: a SEG or a NIfTI/NRRD label map on the series' grid, a 422 saying why not, or a 415
    for neither."""
    try:
        if is_dicom(content):
            label = seg_label_map(read_dicom(content), corpus.series, corpus.spec)
        elif is_label_volume(content):
            label = volume_label_map(content, corpus.series, corpus.spec)
        else:
            return "415: neither"
    except InvalidLabel as refused:
        return f"422: {gist(refused)}"
    assert label.shape == corpus.series.array.shape and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) <= {0} | {item.value for item in corpus.spec.labels}
    return "taken"
