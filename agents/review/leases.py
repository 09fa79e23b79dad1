"""Claims on review cases and their leases: who holds a case, until when, and what a lapsed
lease returns to.

A claim is one guarded UPDATE, so two readers racing for a case end with exactly one holder and
a `Conflict` naming that holder for the other. A lease that lapses returns the case to the
worklist (drafted, or queued when it has no draft); `check_holder` is the test a save must pass,
before its work and again inside its transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from agents.review.cases import OPEN_STATES, Case, Conflict, NotFound, ReviewError, iso
from radloop.db import Annotation, Store, Study
from radloop.domain import AnnotationState, StudyState

log = logging.getLogger(__name__)

_CLAIMABLE = (AnnotationState.QUEUED.value, AnnotationState.DRAFTED.value)


def expire_leases(store: Store, now: datetime) -> int:
    """Return claims lapsed by `now` to the worklist; the last holder stays recorded."""
    with store.read() as session:
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
    with store.transaction() as session:
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


def claim(
    store: Store,
    annotation_id: int,
    user: str,
    lease_minutes: float,
    now: datetime,
    on_claim: Callable[[Session, Annotation], None] | None = None,
) -> None:
    """Give `user` the case for `lease_minutes` from `now`; the holder claiming again renews
    the lease. `on_claim` runs in the claim's transaction when the case changes hands (not on a
    renewal): the selection is recorded with the claim or not at all. Raises `NotFound` or
    `Conflict` (saying why) when the case cannot be claimed."""
    expire_leases(store, now)
    lease = now + timedelta(minutes=lease_minutes)
    with store.transaction() as session:
        before = session.execute(
            select(Annotation.state, Annotation.claimed_by).where(Annotation.id == annotation_id)
        ).first()
        renewal = before is not None and tuple(before) == (AnnotationState.CLAIMED.value, user)
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
            raise _why_not_claimable(session, annotation_id)
        annotation = session.get_one(Annotation, annotation_id)
        study = session.get_one(Study, annotation.study_id)
        if study.state in (StudyState.DRAFTED.value, StudyState.COMPLETE.value):
            study.state = StudyState.IN_REVIEW.value
        if on_claim is not None and not renewal:
            on_claim(session, annotation)
    log.info("annotation %d claimed by %s until %s", annotation_id, user, lease.isoformat())


def _why_not_claimable(session: Session, annotation_id: int) -> ReviewError:
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


def release(
    store: Store, annotation_id: int, user: str, now: datetime, *, force: bool = False
) -> None:
    """Give the case back. Only its holder may, unless `force` (reviewers, admins)."""
    with store.transaction() as session:
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


def check_holder(case_: Case, user: str, now: datetime) -> None:
    """Refuse (`Conflict`, saying why) unless `user` holds `case_` on a lease running at
    `now`."""
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
