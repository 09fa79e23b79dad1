"""Validated corrections become the training set: a `labels` row and an image/label NIfTI
pair per label under `datasets/<model>/<split>/`. The split is decided once per study and never
changes; the pair is staged before the transaction and renamed into place inside it. Both the
staged files and the renames are durable (`radloop.durable`): a validated label survives a
power cut once its transaction commits."""

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
from radloop.durable import durable_path, replace_durably
from radloop.events import LabelValidated, record_event

log = logging.getLogger(__name__)


def stage_pair(
    datasets_dir: Path, annotation_id: int, model: str, series: LoadedSeries, correction: Path
) -> tuple[Path, Path]:
    """Write the training pair (series image, corrected label) under names derived from
    the annotation, outside any transaction: gzip-writing a whole series takes seconds,
    and on SQLite a transaction holds the one write lock that ingest needs too."""
    staging = datasets_dir / model / ".staging"
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
    datasets_dir: Path,
    holdout_fraction: float,
) -> None:
    """Record the label; move the staged pair to its place (a rename, so the transaction
    stays short). A transaction that fails after the rename leaves files no row names."""
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
    folder = datasets_dir / annotation.model_name / split.value
    image_path = folder / f"{label.id:06d}_image.nii.gz"
    label_path = folder / f"{label.id:06d}_label.nii.gz"
    replace_durably(staged[0], image_path)
    replace_durably(staged[1], label_path)
    label.image_path, label.label_path = str(image_path), str(label_path)
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
