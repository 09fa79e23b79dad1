"""What the review service works on: a case (one annotation) as readers see it, read from the
database with the spec and series its labels are checked against, and the refusals review
actions answer with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from radloop.db import Annotation, Selection, Store, Study
from radloop.domain import AnnotationState
from radloop.modelspec import ModelSpec

if TYPE_CHECKING:
    from agents.volume import LoadedSeries

# Cases still waiting for a reader.
OPEN_STATES = (AnnotationState.QUEUED, AnnotationState.DRAFTED, AnnotationState.CLAIMED)


class ReviewError(Exception):
    """A refused review action; `status` is the HTTP status that says what kind."""

    status = 400


class NotFound(ReviewError):
    status = 404


class Conflict(ReviewError):
    status = 409


class Unprocessable(ReviewError):
    status = 422


@dataclass(frozen=True)
class Case:
    """What a correction is checked against."""

    annotation_id: int
    study_uid: str
    series_uid: str
    model: str
    model_version: str | None
    state: str
    claimed_by: str | None
    lease_expires_at: datetime | None
    draft_nifti: str | None

    @classmethod
    def of(cls, annotation: Annotation, study_uid: str) -> Case:
        if annotation.series_uid is None:
            raise Conflict(f"annotation {annotation.id} has no series to label")
        return cls(
            annotation_id=annotation.id,
            study_uid=study_uid,
            series_uid=annotation.series_uid,
            model=annotation.model_name,
            model_version=annotation.model_version,
            state=annotation.state,
            claimed_by=annotation.claimed_by,
            lease_expires_at=annotation.lease_expires_at,
            draft_nifti=annotation.nifti_path,
        )


def load_case(store: Store, annotation_id: int) -> Case:
    """The case `annotation_id` as it is now; `NotFound` when there is none."""
    with store.read() as session:
        row = session.execute(
            select(Annotation, Study.study_uid)
            .join(Study, Study.id == Annotation.study_id)
            .where(Annotation.id == annotation_id)
        ).first()
    if row is None:
        raise NotFound(f"no annotation {annotation_id}")
    annotation, study_uid = row
    return Case.of(annotation, study_uid)


def load_inputs(
    case_: Case, specs: dict[str, ModelSpec], store: Store, spool_dir: Path
) -> tuple[ModelSpec, LoadedSeries]:
    """The spec and the series a label of `case_` is checked against; `Conflict` when either
    is missing."""
    # Here, not at the top: reading the queue (`radloop queue list`, the worklist) decodes no
    # DICOM, and pydicom with highdicom take a second to import.
    from agents.volume import SeriesRejected, load_series, series_files

    spec = specs.get(case_.model)
    if spec is None:
        raise Conflict(f"model {case_.model} has no spec loaded; cannot check labels")
    try:
        series = load_series(series_files(store, spool_dir, case_.series_uid))
    except SeriesRejected as rejected:
        raise Conflict(f"the draft's series cannot be loaded: {rejected}") from None
    return spec, series


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def latest_selections(session: Session, annotation_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The last recorded selection of each case (`selections`), as `item_row` shows it."""
    if not annotation_ids:
        return {}
    rows = session.scalars(
        select(Selection).where(Selection.annotation_id.in_(annotation_ids)).order_by(Selection.id)
    )
    return {
        row.annotation_id: {
            "rank": row.rank,
            "strategy": row.strategy,
            "seed": row.seed,
            "value": row.value,
            "user": row.user_name,
            "batch": row.batch,
            "selected_at": iso(row.created_at),
        }
        for row in rows
    }


def item_row(
    annotation: Annotation,
    study_uid: str,
    study_date: str | None,
    selection: dict[str, Any] | None,
    completed_at: datetime | None = None,
) -> dict[str, Any]:
    return {
        "annotation_id": annotation.id,
        "study_uid": study_uid,
        "study_date": study_date,
        "revision": annotation.study_revision,
        "series_uid": annotation.series_uid,
        "state": annotation.state,
        # Place in the worklist (1 first) while open; otherwise the rank it was picked at.
        "rank": selection.get("rank") if selection else None,
        # The strategy (or "urgent"), seed and value that placed the case, and the draft's
        # uncertainty scores by method.
        "selection": selection,
        "uncertainty": annotation.uncertainty,
        "scores": annotation.scores,
        "urgent": annotation.urgent,
        "model": annotation.model_name,
        "model_version": annotation.model_version,
        "seg_sop_instance_uid": annotation.seg_sop_instance_uid,
        "claimed_by": annotation.claimed_by
        if annotation.state == AnnotationState.CLAIMED.value
        else None,
        "lease_expires_at": iso(annotation.lease_expires_at)
        if annotation.state == AnnotationState.CLAIMED.value
        else None,
        "corrected_by": annotation.corrected_by,
        "corrected_at": iso(annotation.corrected_at),
        "correction_sop_instance_uid": annotation.correction_sop_instance_uid,
        "correction_dice": annotation.correction_dice,
        "correction_dice_per_label": annotation.correction_dice_per_label,
        "validated_by": annotation.validated_by,
        "validated_at": iso(annotation.validated_at),
        "reason": annotation.reason,
        # Its images and draft are readable through DICOMweb; until then, `viewer_error`.
        "viewable": annotation.viewable_at is not None,
        "viewer_error": annotation.viewer_error,
        "created_at": annotation.created_at.isoformat(),
        # The study revision's completion (its annotation job), when the draft was recorded,
        # and the drafting steps' seconds (load_s, infer_s, write_s, store_s).
        "completed_at": iso(completed_at),
        "drafted_at": iso(annotation.created_at) if annotation.seg_sop_instance_uid else None,
        "timings": annotation.timings,
    }
