"""Validated corrections become the training set: a `labels` row and an image/label NIfTI
pair per label under `datasets/<model>/<split>/`. The split is decided once per study and never
changes; the pair is staged before the transaction and moved into place inside it (renamed in a
folder, uploaded to an object store). In a folder both the staged files and the renames are
durable (`radloop.durable`): a validated label survives a power cut once its transaction
commits."""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agents.nifti import write_nifti
from agents.review.cases import OPEN_STATES
from agents.volume import LoadedSeries
from radloop.db import Annotation, Label, Study
from radloop.domain import AnnotationState, LabelSplit, StudyState
from radloop.durable import durable_path
from radloop.events import LabelValidated, record_event
from radloop.objectstore import ObjectStore

log = logging.getLogger(__name__)


def stage_pair(
    datasets: ObjectStore, annotation_id: int, model: str, series: LoadedSeries, correction: Path
) -> tuple[Path, Path]:
    """Write the training pair (series image, corrected label) under names derived from
    the annotation, outside any transaction: gzip-writing a whole series takes seconds,
    and on SQLite a transaction holds the one write lock that ingest needs too."""
    staging = datasets.scratch() / model
    image, label = (
        staging / f"a{annotation_id}_image.nii.gz",
        staging / f"a{annotation_id}_label.nii.gz",
    )
    write_nifti(image, series.array, series.affine)
    with durable_path(label) as temporary:
        shutil.copyfile(correction, temporary)
    return image, label


def add_label(
    session: Session,
    annotation: Annotation,
    study_uid: str,
    user: str,
    series: LoadedSeries,
    staged: tuple[Path, Path],
    now: datetime,
    datasets: ObjectStore,
    holdout_fraction: float,
) -> None:
    """Record the label; move the staged pair to its place (a rename in a folder, an upload to
    an object store, so the transaction stays short). A transaction that fails after the move
    leaves files no row names."""
    split = _split(session, annotation, holdout_fraction)
    label = Label(
        annotation_id=annotation.id,
        study_id=annotation.study_id,
        model_name=annotation.model_name,
        split=split.value,
        series_uid=series.series_uid,
        seg_sop_instance_uid=annotation.correction_sop_instance_uid
        or annotation.seg_sop_instance_uid,
        image_path="",
        label_path="",
        created_at=now,
    )
    session.add(label)
    session.flush()
    folder = f"{annotation.model_name}/{split.value}"
    image_key = f"{folder}/{label.id:06d}_image.nii.gz"
    label_key = f"{folder}/{label.id:06d}_label.nii.gz"
    datasets.put_file(staged[0], image_key)
    datasets.put_file(staged[1], label_key)
    label.image_path, label.label_path = datasets.url(image_key), datasets.url(label_key)
    annotation.state = AnnotationState.VALIDATED.value
    annotation.validated_by = user
    annotation.validated_at = now
    annotation.updated_at = now
    study = session.get_one(Study, annotation.study_id)
    still_open = session.scalar(
        select(func.count())
        .select_from(Annotation)
        .where(
            Annotation.study_id == study.id,
            Annotation.id != annotation.id,
            Annotation.state.in_([s.value for s in OPEN_STATES] + ["corrected"]),
        )
    )
    if not still_open:
        study.state = StudyState.VALIDATED.value
    record_event(
        session,
        LabelValidated(
            label_id=label.id,
            annotation_id=annotation.id,
            study_uid=study_uid,
            series_uid=series.series_uid,
            model=annotation.model_name,
            split=split,
            validated_by=user,
        ),
    )
    log.info("label %d (%s) validated by %s", label.id, split.value, user)


def _split(session: Session, annotation: Annotation, holdout_fraction: float) -> LabelSplit:
    """A study keeps the split of its first label (no leakage between revisions); new
    studies go to the holdout while it is below its configured fraction."""
    earlier = session.scalar(
        select(Label.split).where(
            Label.study_id == annotation.study_id, Label.model_name == annotation.model_name
        )
    )
    if earlier is not None:
        return LabelSplit(earlier)
    rows = session.execute(
        select(Label.split, func.count())
        .where(Label.model_name == annotation.model_name)
        .group_by(Label.split)
    ).all()
    counts = {split: int(n) for split, n in rows}
    holdout = counts.get(LabelSplit.HOLDOUT.value, 0)
    total = sum(counts.values())
    if holdout < holdout_fraction * (total + 1):
        return LabelSplit.HOLDOUT
    return LabelSplit.TRAIN
