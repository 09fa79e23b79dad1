"""The review worklist: the queue of cases in active-learning order, and what readers do on it.

`Worklist` is what the review app, the `radloop queue` CLI and tests hold. It reads the queue
(in `agents.review.order`'s order, one case, counts per state), hands k readers k cases chosen
together, sets a model's strategy, marks cases urgent, validates corrections into the training
set and records who did what in the audit log (`agents.review.audit`); claims and leases are
`agents.review.leases`, taking in corrections is `agents.review.intake`, and it delegates to
them. Every state change is one database transaction guarded by the state it expects, so two
readers racing for one case end with exactly one winner and a clear refusal for the other.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agents.review import leases
from agents.review.audit import Action, AuditLog, audited
from agents.review.cases import (
    OPEN_STATES,
    Conflict,
    NotFound,
    ReviewError,
    Unprocessable,
    item_row,
    latest_selections,
    load_case,
    load_inputs,
)
from agents.review.order import QueueOrder, Ranked
from radloop.db import Annotation, AnnotationJob, Store, Study, utcnow
from radloop.domain import AnnotationState
from radloop.modelspec import ModelSpec
from radloop.objectstore import ObjectStore
from radloop.settings import ReviewSettings

if TYPE_CHECKING:
    from agents.review.intake import CorrectionIntake

__all__ = ["OPEN_STATES", "Conflict", "NotFound", "ReviewError", "Unprocessable", "Worklist"]


class Worklist:
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
        """`clock` gives the time leases are measured against (tests move it forward)."""
        self.clock = clock
        self.store = store
        self.settings = settings
        self.specs = specs
        self.spool_dir = spool_dir
        self.datasets = datasets
        self.order = QueueOrder(store, specs)
        self.audit = AuditLog(store, clock)
        self.drafts_dir = drafts_dir

    @cached_property
    def intake(self) -> CorrectionIntake:
        # Imported on the first correction, with the label readers and the DICOM decoders
        # (nibabel, SciPy, pydicom, highdicom: a second or two): reading the queue needs none.
        from agents.review.intake import CorrectionIntake

        return CorrectionIntake(
            self.store,
            self.settings,
            self.specs,
            self.spool_dir,
            self.drafts_dir,
            self.datasets,
            self.clock,
        )

    # -- reading -------------------------------------------------------------------------

    def items(
        self,
        states: tuple[AnnotationState, ...] | None = OPEN_STATES,
        limit: int = 500,
        annotation_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """Cases in the worklist's order (`agents.review.order`: urgent first, then each
        model's strategy, draftless last), then those in readers' hands, then the rest, newest
        first. Each carries its `selection`: the strategy's ranking, or the last recorded one."""
        self.expire_leases()
        query = (
            select(Annotation, Study.study_uid, Study.study_date, AnnotationJob.completed_at)
            .join(Study, Study.id == Annotation.study_id)
            .outerjoin(AnnotationJob, AnnotationJob.annotation_id == Annotation.id)
        )
        if states is not None:
            query = query.where(Annotation.state.in_([s.value for s in states]))
        if annotation_id is not None:
            query = query.where(Annotation.id == annotation_id)
        with self.store.read() as session:
            ranking = self.order.rank(session)
            rows = list(session.execute(query))
            last = latest_selections(
                session, [row[0].id for row in rows if row[0].id not in ranking]
            )

        def place(row: Any) -> tuple[int, int, float, int]:
            annotation = row[0]
            if annotation.id in ranking:
                return (0, ranking[annotation.id].position, 0.0, annotation.id)
            held = annotation.state == AnnotationState.CLAIMED.value
            return (1 if held else 2, 0, -annotation.updated_at.timestamp(), annotation.id)

        listed = []
        for annotation, study_uid, study_date, completed_at in sorted(rows, key=place)[:limit]:
            ranked = ranking.get(annotation.id)
            selection = ranked.as_dict() if ranked else last.get(annotation.id)
            listed.append(item_row(annotation, study_uid, study_date, selection, completed_at))
        return listed

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

    # -- claims (agents.review.leases) ---------------------------------------------------

    def expire_leases(self) -> int:
        """Return lapsed claims to the worklist; the last holder stays recorded."""
        return leases.expire_leases(self.store, self.clock())

    def claim(self, annotation_id: int, user: str) -> dict[str, Any]:
        """Take the case for `lease_minutes`; the holder claiming again renews the lease. The
        pick is recorded as a selection with the case's place in the worklist."""
        with self.store.read() as session:
            ranked = self.order.rank(session).get(annotation_id)
        self._claim_recorded(annotation_id, user, ranked, uuid.uuid4().hex)
        return self.item(annotation_id)

    def _claim_recorded(
        self, annotation_id: int, user: str, ranked: Ranked | None, batch: str
    ) -> None:
        """`leases.claim`, recording the selection in the claim's transaction."""
        now = self.clock()

        def record(session: Session, annotation: Annotation) -> None:
            QueueOrder.record(session, annotation, user, ranked, batch, now)
            audited(session, user, Action.CLAIM, annotation, now)

        leases.claim(self.store, annotation_id, user, self.settings.lease_minutes, now, record)

    def next_cases(
        self, users: Sequence[str], model: str | None = None, strategy: str | None = None
    ) -> list[dict[str, Any]]:
        """One case for each of `users` (k readers asking at once), chosen together from one
        ranking, so a diversity-aware strategy never hands two of them near-duplicates; each
        is claimed with its lease and recorded as a selection of one batch. A case taken by
        someone else meanwhile makes the rest be ranked again, with that case covered. Fewer
        cases than readers: the last readers get none. `strategy` ranks by another strategy
        than the models' own this once (it is recorded as such)."""
        self.expire_leases()
        batch = uuid.uuid4().hex
        given: list[dict[str, Any]] = []
        waiting = list(users)
        for _ in range(len(users) + 8):  # each retry follows a case lost to another reader
            if not waiting:
                break
            with self.store.read() as session:
                ranking = self.order.rank(session, viewable_only=True, override=strategy)
                if model is not None:
                    models = dict(
                        session.execute(
                            select(Annotation.id, Annotation.model_name).where(
                                Annotation.id.in_(list(ranking))
                            )
                        ).all()
                    )
                    ranking = {k: v for k, v in ranking.items() if models.get(k) == model}
            order = sorted(ranking.items(), key=lambda item: item[1].position)
            if not order:
                break
            lost = False
            for annotation_id, ranked in order:
                if not waiting:
                    break
                try:
                    self._claim_recorded(annotation_id, waiting[0], ranked, batch)
                except Conflict:
                    lost = True
                    break
                waiting.pop(0)
                given.append(self.item(annotation_id))
            if not lost:
                break
        return given

    def release(self, annotation_id: int, user: str, *, force: bool = False) -> dict[str, Any]:
        """Give the case back. Only its holder may, unless `force` (reviewers, admins)."""
        leases.release(self.store, annotation_id, user, self.clock(), force=force)
        self.audit.record(user, Action.RELEASE, annotation_id)
        return self.item(annotation_id)

    def set_strategy(
        self, model: str, strategy: str, seed: int | None, user: str
    ) -> dict[str, Any]:
        """Make `strategy` the model's active-learning strategy: the open queue is ranked by it
        from the next read on."""
        chosen = self.order.set_strategy(model, strategy, seed, user, self.clock())
        return {"model": model, "strategy": chosen.strategy, "seed": chosen.seed}

    def set_urgent(self, annotation_id: int, urgent: bool, user: str) -> dict[str, Any]:
        with self.store.transaction() as session:
            annotation = session.get(Annotation, annotation_id)
            if annotation is None:
                raise NotFound(f"no annotation {annotation_id}")
            annotation.urgent = urgent
            annotation.updated_at = self.clock()
            audited(session, user, Action.URGENT, annotation, annotation.updated_at)
        return self.item(annotation_id)

    # -- corrections (agents.review.intake) ----------------------------------------------

    def open_case_for_study(self, study_uid: str, series_uids: set[str], user: str) -> int | None:
        """The annotation a SEG on `series_uids` of `study_uid` corrects, or None when radloop
        drafts nothing there. Prefers the case `user` holds."""
        return self.intake.open_case_for_study(study_uid, series_uids, user)

    def correct_with_seg(self, annotation_id: int, user: str, data: bytes) -> dict[str, Any]:
        """A SEG (as OHIF saves it) becomes the correction of the draft; idempotent on its SOP
        Instance UID, so a client's retry of the same save is answered with the same result."""
        self.intake.correct_with_seg(annotation_id, user, data)
        self.audit.record(user, Action.CORRECT, annotation_id)
        return self.item(annotation_id)

    def correct_with_volume(self, annotation_id: int, user: str, data: bytes) -> dict[str, Any]:
        """A NIfTI or NRRD label map becomes the correction; radloop writes it as a MANUAL SEG
        too."""
        self.intake.correct_with_volume(annotation_id, user, data)
        self.audit.record(user, Action.CORRECT, annotation_id)
        return self.item(annotation_id)

    def accept_draft(self, annotation_id: int, user: str) -> dict[str, Any]:
        """The reader found nothing to change: the draft itself is the correction (Dice 1)."""
        self.intake.accept_draft(annotation_id, user)
        self.audit.record(user, Action.ACCEPT, annotation_id)
        return self.item(annotation_id)

    # -- validation ---------------------------------------------------------------------

    def validate(self, annotation_id: int, user: str) -> dict[str, Any]:
        """A reviewer accepts the correction: it becomes a label in the training set."""
        # Imported here for the reason `intake` is: reading the queue needs neither.
        from agents.review.training_set import add_label, stage_pair

        case_ = load_case(self.store, annotation_id)
        if case_.state != AnnotationState.CORRECTED.value:
            raise Conflict(f"annotation {annotation_id} is {case_.state}, not corrected")
        _, series = load_inputs(case_, self.specs, self.store, self.spool_dir)
        with self.store.read() as session:
            correction_path = session.get_one(Annotation, annotation_id).correction_path
        if correction_path is None:
            raise Conflict(f"annotation {annotation_id} has no correction to validate")
        staged = stage_pair(
            self.datasets, annotation_id, case_.model, series, Path(correction_path)
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
            add_label(
                session,
                annotation,
                case_.study_uid,
                user,
                series,
                staged,
                self.clock(),
                self.datasets,
                self.settings.holdout_fraction,
            )
            audited(session, user, Action.VALIDATE, annotation, self.clock())
        return self.item(annotation_id)
