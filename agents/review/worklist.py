"""The review worklist: claims with leases, corrections, validation into the training set.

Every state change is one database transaction guarded by the state it expects, so two readers
racing for one case, or a save racing a lapsing lease, end with exactly one winner and a clear
refusal for the other. Files (correction SEG and NIfTI, dataset pairs) are written before the
transaction under names derived from ids, so a retry rewrites the same files.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from agents.drafts import write_draft
from agents.review.cases import (
    OPEN_STATES,
    Case,
    Conflict,
    NotFound,
    ReviewError,
    Unprocessable,
    iso,
    item_row,
)
from agents.review.corrections import (
    InvalidLabel,
    dice_per_label,
    mean_dice,
    nifti_label_map,
    read_dicom,
    read_nifti_label,
    require_not_empty,
    seg_label_map,
    write_nifti,
)
from agents.review.training_set import add_label, stage_pair
from agents.volume import LoadedSeries, SeriesRejected, load_series, series_files
from radloop.db import Annotation, Store, Study, utcnow
from radloop.domain import AnnotationState, StudyState
from radloop.events import AnnotationCorrected, EventType, record_event
from radloop.modelspec import ModelSpec
from radloop.settings import ReviewSettings

log = logging.getLogger(__name__)

__all__ = ["OPEN_STATES", "Conflict", "NotFound", "ReviewError", "Unprocessable", "Worklist"]

_CLAIMABLE = (AnnotationState.QUEUED.value, AnnotationState.DRAFTED.value)


class Worklist:
    def __init__(
        self,
        store: Store,
        settings: ReviewSettings,
        specs: dict[str, ModelSpec],
        spool_dir: Path,
        drafts_dir: Path,
        datasets_dir: Path,
    ) -> None:
        self.store = store
        self.settings = settings
        self.specs = specs
        self.spool_dir = spool_dir
        self.drafts_dir = drafts_dir
        self.datasets_dir = datasets_dir

    # -- reading -------------------------------------------------------------------------

    def priority_expression(self) -> Any:
        boost = case((Annotation.urgent, self.settings.urgency_boost), else_=0.0)
        return func.coalesce(Annotation.priority, 0.0) + boost

    def items(
        self,
        states: tuple[AnnotationState, ...] | None = OPEN_STATES,
        limit: int = 500,
        annotation_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """Cases by priority (uncertainty + urgency boost), highest first; draftless last."""
        self.expire_leases()
        priority = self.priority_expression()
        query = (
            select(Annotation, Study.study_uid, Study.study_date, priority.label("effective"))
            .join(Study, Study.id == Annotation.study_id)
            .order_by(
                Annotation.seg_sop_instance_uid.is_(None),
                priority.desc(),
                Annotation.created_at,
            )
            .limit(limit)
        )
        if states is not None:
            query = query.where(Annotation.state.in_([s.value for s in states]))
        if annotation_id is not None:
            query = query.where(Annotation.id == annotation_id)
        with self.store.read() as session:
            return [
                item_row(annotation, study_uid, study_date, effective)
                for annotation, study_uid, study_date, effective in session.execute(query)
            ]

    def item(self, annotation_id: int) -> dict[str, Any]:
        found = self.items(states=None, annotation_id=annotation_id)
        if not found:
            raise NotFound(f"no annotation {annotation_id}")
        return found[0]

    def counts(self) -> dict[str, int]:
        self.expire_leases()
        with self.store.read() as session:
            rows = session.execute(
                select(Annotation.state, func.count()).group_by(Annotation.state)
            ).all()
        counts = {state.value: 0 for state in AnnotationState}
        counts.update({state: int(n) for state, n in rows})
        return counts

    # -- claims ----------------------------------------------------------------------------

    def expire_leases(self) -> int:
        """Return lapsed claims to the worklist; the last holder stays recorded."""
        now = utcnow()
        with self.store.read() as session:
            lapsed = session.scalar(
                select(func.count())
                .select_from(Annotation)
                .where(
                    Annotation.state == AnnotationState.CLAIMED.value,
                    Annotation.lease_expires_at < now,
                )
            )
        if not lapsed:
            return 0
        with self.store.transaction() as session:
            result = session.execute(
                update(Annotation)
                .where(
                    Annotation.state == AnnotationState.CLAIMED.value,
                    Annotation.lease_expires_at < now,
                )
                .values(
                    state=case(
                        (Annotation.seg_sop_instance_uid.is_(None), AnnotationState.QUEUED.value),
                        else_=AnnotationState.DRAFTED.value,
                    ),
                    updated_at=now,
                )
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def claim(self, annotation_id: int, user: str) -> dict[str, Any]:
        """Take the case for `lease_minutes`; the holder claiming again renews the lease."""
        self.expire_leases()
        now = utcnow()
        lease = now + timedelta(minutes=self.settings.lease_minutes)
        with self.store.transaction() as session:
            result = session.execute(
                update(Annotation)
                .where(
                    Annotation.id == annotation_id,
                    Annotation.series_uid.is_not(None),
                    Annotation.viewable_at.is_not(None),
                    (Annotation.state.in_(_CLAIMABLE))
                    | (
                        (Annotation.state == AnnotationState.CLAIMED.value)
                        & (Annotation.claimed_by == user)
                    ),
                )
                .values(
                    state=AnnotationState.CLAIMED.value,
                    claimed_by=user,
                    lease_expires_at=lease,
                    updated_at=now,
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise self._why_not_claimable(session, annotation_id)
            annotation = session.get_one(Annotation, annotation_id)
            study = session.get_one(Study, annotation.study_id)
            if study.state in (StudyState.DRAFTED.value, StudyState.COMPLETE.value):
                study.state = StudyState.IN_REVIEW.value
        log.info("annotation %d claimed by %s until %s", annotation_id, user, lease.isoformat())
        return self.item(annotation_id)

    def _why_not_claimable(self, session: Session, annotation_id: int) -> ReviewError:
        annotation = session.get(Annotation, annotation_id)
        if annotation is None:
            return NotFound(f"no annotation {annotation_id}")
        if annotation.viewable_at is None and annotation.series_uid is not None:
            return Conflict(
                f"annotation {annotation_id} cannot be opened yet: "
                + (annotation.viewer_error or "its images are being stored for the viewer")
            )
        if annotation.state == AnnotationState.CLAIMED.value:
            return Conflict(
                f"annotation {annotation_id} is held by {annotation.claimed_by} "
                f"until {iso(annotation.lease_expires_at)}"
            )
        if annotation.series_uid is None:
            return Conflict(f"annotation {annotation_id} has no series to label")
        return Conflict(f"annotation {annotation_id} is {annotation.state}, not open for review")

    def release(self, annotation_id: int, user: str, *, force: bool = False) -> dict[str, Any]:
        """Give the case back. Only its holder may, unless `force` (reviewers, admins)."""
        now = utcnow()
        with self.store.transaction() as session:
            annotation = session.get(Annotation, annotation_id)
            if annotation is None:
                raise NotFound(f"no annotation {annotation_id}")
            if annotation.state != AnnotationState.CLAIMED.value:
                raise Conflict(f"annotation {annotation_id} is {annotation.state}, not claimed")
            if annotation.claimed_by != user and not force:
                raise Conflict(
                    f"annotation {annotation_id} is held by {annotation.claimed_by}, not {user}"
                )
            annotation.state = (
                AnnotationState.DRAFTED.value
                if annotation.seg_sop_instance_uid
                else AnnotationState.QUEUED.value
            )
            annotation.lease_expires_at = now
            annotation.updated_at = now
        return self.item(annotation_id)

    def set_urgent(self, annotation_id: int, urgent: bool) -> dict[str, Any]:
        with self.store.transaction() as session:
            annotation = session.get(Annotation, annotation_id)
            if annotation is None:
                raise NotFound(f"no annotation {annotation_id}")
            annotation.urgent = urgent
            annotation.updated_at = utcnow()
        return self.item(annotation_id)

    # -- corrections -------------------------------------------------------------------

    def open_case_for_study(self, study_uid: str, series_uids: set[str], user: str) -> int | None:
        """The annotation a SEG on `series_uids` of `study_uid` corrects, or None when radloop
        drafts nothing there. Prefers the case `user` holds."""
        with self.store.read() as session:
            rows = session.execute(
                select(Annotation.id, Annotation.claimed_by, Annotation.state)
                .join(Study, Study.id == Annotation.study_id)
                .where(Study.study_uid == study_uid, Annotation.series_uid.in_(series_uids))
                .order_by(Annotation.id.desc())
            ).all()
        if not rows:
            return None
        for annotation_id, holder, state in rows:
            if holder == user and state == AnnotationState.CLAIMED.value:
                return int(annotation_id)
        return int(rows[0][0])

    def correct_with_seg(self, annotation_id: int, user: str, data: bytes) -> dict[str, Any]:
        """A SEG (as OHIF saves it) becomes the correction of the draft; idempotent on its SOP
        Instance UID, so a client's retry of the same save is answered with the same result."""
        case_ = self._case(annotation_id)
        ds = _label(lambda: read_dicom(data))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if self._already_recorded(annotation_id, sop_uid):
            return self.item(annotation_id)
        self._check_holder(case_, user)
        spec, series = self._load(case_)
        label_map = _label(lambda: seg_label_map(ds, series, spec))
        path = self.drafts_dir / case_.study_uid / "corrections" / f"{sop_uid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self._record(case_, user, spec, series, label_map, sop_uid, path)

    def correct_with_nifti(self, annotation_id: int, user: str, data: bytes) -> dict[str, Any]:
        """A NIfTI label map becomes the correction; radloop writes it as a MANUAL SEG too."""
        case_ = self._case(annotation_id)
        self._check_holder(case_, user)
        spec, series = self._load(case_)
        label_map = _label(lambda: nifti_label_map(data, series, spec))
        _label(lambda: require_not_empty(label_map))
        files = write_draft(
            series,
            label_map,
            spec,
            case_.model_version or "none",
            self.drafts_dir / case_.study_uid / "corrections",
            reader=user,
        )
        return self._record(
            case_, user, spec, series, label_map, files.seg_sop_instance_uid, files.seg_path
        )

    def accept_draft(self, annotation_id: int, user: str) -> dict[str, Any]:
        """The reader found nothing to change: the draft itself is the correction (Dice 1)."""
        case_ = self._case(annotation_id)
        self._check_holder(case_, user)
        if case_.draft_nifti is None:
            raise Conflict(f"annotation {annotation_id} has no draft to accept")
        spec, series = self._load(case_)
        label_map = read_nifti_label(Path(case_.draft_nifti))
        with self.store.read() as session:
            draft = session.get_one(Annotation, annotation_id)
            sop_uid, seg_path = draft.seg_sop_instance_uid, draft.seg_path
        if sop_uid is None or seg_path is None:
            raise Conflict(f"annotation {annotation_id} has no draft SEG to accept")
        return self._record(
            case_, user, spec, series, label_map, sop_uid, Path(seg_path), accepted=True
        )

    def _case(self, annotation_id: int) -> Case:
        with self.store.read() as session:
            row = session.execute(
                select(Annotation, Study.study_uid)
                .join(Study, Study.id == Annotation.study_id)
                .where(Annotation.id == annotation_id)
            ).first()
        if row is None:
            raise NotFound(f"no annotation {annotation_id}")
        annotation, study_uid = row
        return Case.of(annotation, study_uid)

    def _check_holder(self, case_: Case, user: str, now: datetime | None = None) -> None:
        now = now or utcnow()
        lease = case_.lease_expires_at
        holds = case_.state == AnnotationState.CLAIMED.value and case_.claimed_by == user
        if holds and lease is not None and lease > now:
            return
        if case_.claimed_by == user and lease is not None and lease <= now:
            raise Conflict(
                f"your lease on annotation {case_.annotation_id} expired at {iso(lease)}; "
                "claim the case again to save"
            )
        if case_.state == AnnotationState.CLAIMED.value:
            raise Conflict(
                f"annotation {case_.annotation_id} is held by {case_.claimed_by} until {iso(lease)}"
            )
        if case_.state not in (s.value for s in OPEN_STATES):
            raise Conflict(f"annotation {case_.annotation_id} is already {case_.state}")
        raise Conflict(f"claim annotation {case_.annotation_id} before saving a correction")

    def _already_recorded(self, annotation_id: int, sop_uid: str) -> bool:
        with self.store.read() as session:
            return (
                session.scalar(
                    select(Annotation.id).where(
                        Annotation.id == annotation_id,
                        Annotation.correction_sop_instance_uid == sop_uid,
                    )
                )
                is not None
            )

    def _load(self, case_: Case) -> tuple[ModelSpec, LoadedSeries]:
        spec = self.specs.get(case_.model)
        if spec is None:
            raise Conflict(f"model {case_.model} has no spec loaded; cannot check labels")
        try:
            series = load_series(series_files(self.store, self.spool_dir, case_.series_uid))
        except SeriesRejected as rejected:
            raise Conflict(f"the draft's series cannot be loaded: {rejected}") from None
        return spec, series

    def _record(
        self,
        case_: Case,
        user: str,
        spec: ModelSpec,
        series: LoadedSeries,
        label_map: NDArray[np.uint8],
        sop_uid: str,
        seg_path: Path,
        *,
        accepted: bool = False,
    ) -> dict[str, Any]:
        _label(lambda: require_not_empty(label_map))
        draft = (
            read_nifti_label(Path(case_.draft_nifti))
            if case_.draft_nifti
            else np.zeros_like(label_map)
        )
        scores = dice_per_label(draft, label_map, spec)
        dice = mean_dice(scores)
        label_path = seg_path.with_name(seg_path.name.removesuffix(".dcm") + ".label.nii.gz")
        write_nifti(label_map, series, label_path)
        staged = (
            stage_pair(self.datasets_dir, case_.annotation_id, case_.model, series, label_path)
            if self.settings.single_reader
            else None
        )
        now = utcnow()
        with self.store.transaction() as session:
            annotation = session.get_one(Annotation, case_.annotation_id)
            # Checked again inside the transaction: the lease may have lapsed while we worked.
            self._check_holder(Case.of(annotation, case_.study_uid), user, now)
            annotation.state = AnnotationState.CORRECTED.value
            annotation.corrected_by = user
            annotation.corrected_at = now
            annotation.correction_sop_instance_uid = None if accepted else sop_uid
            annotation.correction_path = str(label_path)
            annotation.correction_dice = dice
            annotation.correction_dice_per_label = scores
            annotation.lease_expires_at = now
            annotation.updated_at = now
            record_event(
                session,
                EventType.ANNOTATION_CORRECTED,
                AnnotationCorrected(
                    annotation_id=annotation.id,
                    study_uid=case_.study_uid,
                    model=case_.model,
                    model_version=case_.model_version,
                    correction_sop_instance_uid=sop_uid,
                    dice=dice,
                    reader=user,
                ),
            )
            if staged is not None:
                self._add_label(session, annotation, case_.study_uid, user, series, staged, now)
        log.info(
            "annotation %d corrected by %s: Dice(draft, correction) %.3f",
            case_.annotation_id,
            user,
            dice,
        )
        return self.item(case_.annotation_id)

    # -- validation -------------------------------------------------------------------

    def validate(self, annotation_id: int, user: str) -> dict[str, Any]:
        """A reviewer accepts the correction: it becomes a label in the training set."""
        case_ = self._case(annotation_id)
        if case_.state != AnnotationState.CORRECTED.value:
            raise Conflict(f"annotation {annotation_id} is {case_.state}, not corrected")
        _, series = self._load(case_)
        with self.store.read() as session:
            correction_path = session.get_one(Annotation, annotation_id).correction_path
        if correction_path is None:
            raise Conflict(f"annotation {annotation_id} has no correction to validate")
        staged = stage_pair(
            self.datasets_dir, annotation_id, case_.model, series, Path(correction_path)
        )
        with self.store.transaction() as session:
            annotation = session.get_one(Annotation, annotation_id)
            if annotation.state != AnnotationState.CORRECTED.value:
                raise Conflict(f"annotation {annotation_id} is {annotation.state}, not corrected")
            if annotation.corrected_by == user:
                raise Conflict(
                    f"{user} made this correction; a second person validates it "
                    "(review.single_reader lets the save validate on one-reader sites)"
                )
            self._add_label(session, annotation, case_.study_uid, user, series, staged, utcnow())
        return self.item(annotation_id)

    def _add_label(
        self,
        session: Session,
        annotation: Annotation,
        study_uid: str,
        user: str,
        series: LoadedSeries,
        staged: tuple[Path, Path],
        now: datetime,
    ) -> None:
        add_label(
            session,
            annotation,
            study_uid,
            user,
            series,
            staged,
            now,
            self.datasets_dir,
            self.settings.holdout_fraction,
        )


def _label(make: Any) -> Any:
    try:
        return make()
    except InvalidLabel as invalid:
        raise Unprocessable(str(invalid)) from None
