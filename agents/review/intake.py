"""Correction intake: what a reader saved becomes the correction of the case they hold.

Three ways in — a DICOM SEG (as OHIF saves it, through the API or the DICOMweb proxy's STOW), a
NIfTI label map (written as a MANUAL SEG too), or accepting the draft unchanged — and one way
through: the label map is checked against the spec and series, compared with the draft (Dice per
label), written beside the draft as NIfTI, and the case moves to corrected in one transaction
that checks the lease again and records `radloop.annotation.corrected`. On single-reader sites
the same transaction adds the label to the training set. Files are written before the
transaction under names derived from ids, so a retry rewrites the same files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select

from agents.drafts import remove_cut_attempts, write_draft
from agents.metrics import dice_per_label, mean_dice
from agents.nifti import read_label_map, write_nifti
from agents.review.cases import Case, Conflict, Unprocessable, load_case, load_inputs
from agents.review.corrections import (
    InvalidLabel,
    read_dicom,
    require_not_empty,
    seg_label_map,
    volume_label_map,
)
from agents.review.leases import check_holder
from agents.review.training_set import add_label, stage_pair
from agents.volume import LoadedSeries
from radloop.db import Annotation, Store, Study, utcnow
from radloop.domain import AnnotationState
from radloop.durable import write_bytes_durably
from radloop.events import AnnotationCorrected, record_event
from radloop.modelspec import ModelSpec
from radloop.objectstore import ObjectStore
from radloop.settings import ReviewSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class CorrectionIntake:
    """Records corrections of claimed cases; each method raises a `ReviewError` saying why
    when it refuses, and changes nothing then."""

    def __init__(
        self,
        store: Store,
        settings: ReviewSettings,
        specs: dict[str, ModelSpec],
        spool_dir: Path,
        drafts_dir: Path,
        datasets: ObjectStore,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.settings = settings
        self.specs = specs
        self.spool_dir = spool_dir
        self.drafts_dir = drafts_dir
        self.datasets = datasets
        self.clock = clock

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

    def correct_with_seg(self, annotation_id: int, user: str, data: bytes) -> None:
        """A SEG (as OHIF saves it) becomes the correction of the draft; idempotent on its SOP
        Instance UID, so a client's retry of the same save changes nothing."""
        case_ = load_case(self.store, annotation_id)
        ds = _label(lambda: read_dicom(data))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if self._already_recorded(annotation_id, sop_uid):
            return
        check_holder(case_, user, self.clock())
        spec, series = self._inputs(case_)
        label_map = _label(lambda: seg_label_map(ds, series, spec))
        path = self._corrections(case_) / f"{sop_uid}.dcm"
        write_bytes_durably(path, data)
        self._record(case_, user, spec, series, label_map, sop_uid, path)

    def correct_with_volume(self, annotation_id: int, user: str, data: bytes) -> None:
        """A NIfTI or NRRD label map becomes the correction; radloop writes it as a MANUAL SEG
        too."""
        case_ = load_case(self.store, annotation_id)
        check_holder(case_, user, self.clock())
        spec, series = self._inputs(case_)
        label_map = _label(lambda: volume_label_map(data, series, spec))
        _label(lambda: require_not_empty(label_map))
        files = write_draft(
            series,
            label_map,
            spec,
            case_.model_version or "none",
            self._corrections(case_),
            reader=user,
        )
        self._record(
            case_, user, spec, series, label_map, files.seg_sop_instance_uid, files.seg_path
        )

    def accept_draft(self, annotation_id: int, user: str) -> None:
        """The reader found nothing to change: the draft itself is the correction (Dice 1)."""
        case_ = load_case(self.store, annotation_id)
        check_holder(case_, user, self.clock())
        if case_.draft_nifti is None:
            raise Conflict(f"annotation {annotation_id} has no draft to accept")
        spec, series = self._inputs(case_)
        label_map = read_label_map(Path(case_.draft_nifti))
        with self.store.read() as session:
            draft = session.get_one(Annotation, annotation_id)
            sop_uid, seg_path = draft.seg_sop_instance_uid, draft.seg_path
        if sop_uid is None or seg_path is None:
            raise Conflict(f"annotation {annotation_id} has no draft SEG to accept")
        self._record(case_, user, spec, series, label_map, sop_uid, Path(seg_path), accepted=True)

    def _corrections(self, case_: Case) -> Path:
        """The folder of the case's correction: one per case, so that files a cut or refused
        save left can be told apart from the one that committed (`remove_cut_attempts`)."""
        return (
            self.drafts_dir / case_.study_uid / "corrections" / f"annotation-{case_.annotation_id}"
        )

    def _inputs(self, case_: Case) -> tuple[ModelSpec, LoadedSeries]:
        return load_inputs(case_, self.specs, self.store, self.spool_dir)

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
    ) -> None:
        _label(lambda: require_not_empty(label_map))
        draft = (
            read_label_map(Path(case_.draft_nifti))
            if case_.draft_nifti
            else np.zeros_like(label_map)
        )
        scores = dice_per_label(draft, label_map, spec)
        dice = mean_dice(scores)
        label_path = seg_path.with_name(seg_path.name.removesuffix(".dcm") + ".label.nii.gz")
        write_nifti(label_path, label_map, series.affine)
        staged = (
            stage_pair(self.datasets, case_.annotation_id, case_.model, series, label_path)
            if self.settings.single_reader
            else None
        )
        now = self.clock()
        with self.store.transaction() as session:
            annotation = session.get_one(Annotation, case_.annotation_id)
            # Checked again inside the transaction: the lease may have lapsed while we worked.
            check_holder(Case.of(annotation, case_.study_uid), user, now)
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
                add_label(
                    session,
                    annotation,
                    case_.study_uid,
                    user,
                    series,
                    staged,
                    now,
                    self.datasets,
                    self.settings.holdout_fraction,
                )
        if not accepted:  # an accepted draft's files are the draft's own
            # This correction's files are named after its SEG: <uid>.dcm, .nii.gz, .label.nii.gz
            mine = seg_path.parent.glob(seg_path.name.removesuffix(".dcm") + ".*")
            remove_cut_attempts(seg_path.parent, keep=set(mine))
        log.info(
            "annotation %d corrected by %s: Dice(draft, correction) %.3f",
            case_.annotation_id,
            user,
            dice,
        )


def _label(make: Callable[[], T]) -> T:
    """`make()`, its `InvalidLabel` answered as `Unprocessable` (422)."""
    try:
        return make()
    except InvalidLabel as invalid:
        raise Unprocessable(str(invalid)) from None
