"""Studies as they are after a push and after drafting, for tests that start from there."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pyorthanc import Orthanc

from agents.annotator import Annotator
from agents.drafts import segment_descriptions
from agents.review.worklist import Worklist
from agents.volume import load_series, series_files
from dicom_listener import Ingestor, InstanceHeader, StudyAssembler
from model_registry.inference import InProcessBackend
from model_registry.repository import TritonRepository
from radloop.app.phantoms import WrittenStudy, write_study
from radloop.db import Store
from radloop.domain import IngestSource
from radloop.modelspec import ModelSpec
from radloop.settings import Settings


def received_phantom(
    store: Store, settings: Settings, tmp_path: Path, seed: int, without: tuple[str, ...] = ()
) -> WrittenStudy:
    """A phantom study ingested and completed, as after a push; its files lack the attributes
    named in `without`."""
    study = write_study(tmp_path / "phantoms", seed, seed=seed)
    if without:
        strip_attributes(sorted(study.dicom_dir.glob("*.dcm")), without)
    ingestor = Ingestor(store, settings.spool_dir)
    for path in sorted(study.dicom_dir.glob("*.dcm")):
        ds = dcmread(path)
        header = InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
        ingestor.ingest(header, path.read_bytes(), IngestSource.DIMSE)
    assert StudyAssembler(store, 1).complete(study.study_uid) is not None
    return study


def strip_attributes(paths: list[Path], keywords: tuple[str, ...]) -> None:
    """Remove `keywords` from each file in place (as a de-identifying export leaves them)."""
    for path in paths:
        ds = dcmread(path)
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)


def annotator(store: Store, settings: Settings, orthanc: Orthanc | None) -> Annotator:
    return Annotator(
        store,
        settings.spool_dir,
        settings.drafts_dir,
        TritonRepository(settings.model_repository),
        InProcessBackend(settings.model_repository),
        orthanc,
    )


def worklist(store: Store, settings: Settings, spec: ModelSpec) -> Worklist:
    """The review worklist as the review service builds it, for one model."""
    return Worklist(
        store,
        settings.review,
        {spec.name: spec},
        settings.spool_dir,
        settings.drafts_dir,
        settings.shared_store("datasets"),
    )


def correction_seg(
    store: Store,
    settings: Settings,
    spec: ModelSpec,
    study: WrittenStudy,
    labels: np.ndarray[Any, Any],
    out_dir: Path,
    *,
    names: list[str] | None = None,
) -> bytes:
    """A correction SEG as a viewer writes one: MANUAL segments named like the draft's, frames
    referencing the source slices, empty frames left out (OHIF/dcmjs do the same). `names`
    renames segments (a renamed one gets a code the spec does not know)."""
    series = load_series(series_files(store, settings.spool_dir, study.series_uid))
    descriptions = segment_descriptions(spec, None)
    if names is not None:
        for description, name in zip(descriptions, names, strict=True):
            if description.SegmentLabel != name:
                description.SegmentLabel = name
                code = description.SegmentedPropertyTypeCodeSequence[0]
                code.CodeValue, code.CodeMeaning = "108369006", name  # SCT Neoplasm
    present = sorted(int(v) for v in np.unique(labels) if v)
    seg = hd.seg.Segmentation(
        source_images=series.source,
        pixel_array=labels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[d for d in descriptions if d.SegmentNumber in present],
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="OHIF",
        manufacturer_model_name="cornerstone3D",
        software_versions="3.13.2",
        device_serial_number="1",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{seg.SOPInstanceUID}.dcm"
    seg.save_as(path)
    return path.read_bytes()


def reference_dice(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], spec: ModelSpec) -> float:
    """Mean Dice over the spec's labels, computed here independently of radloop, with the
    policy of agents.metrics: a label absent from both maps scores 1."""
    scores = []
    for label in spec.labels:
        x, y = a == label.value, b == label.value
        total = x.sum() + y.sum()
        scores.append(2 * (x & y).sum() / total if total else 1.0)
    return float(np.mean(scores))


def stow_body(*instances: bytes) -> tuple[bytes, str]:
    """A STOW-RS request body as dicomweb-client (OHIF) builds it."""
    boundary = uuid.uuid4().hex
    body = b""
    for data in instances:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'
