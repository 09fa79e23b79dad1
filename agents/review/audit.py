"""The audit log: who viewed, claimed, changed or validated which case (OWASP ASVS V7.1).

Rows name the user, the action and internal ids (study, annotation), never a UID or patient
data, so the log can be shown to whoever audits access. Claims are recorded in the claim's own
transaction; the other actions right after theirs commit (a crash in between loses that row,
not the change). A view is a DICOMweb read of a study (what a viewer does to show it) or MONAI
Label fetching its image, recorded once per user and study in `VIEW_WINDOW`: a viewer reads a
study in hundreds of requests.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from radloop.db import Annotation, AuditEvent, Store, Study

VIEW_WINDOW = timedelta(minutes=10)


class Action(StrEnum):
    VIEW = "view"
    CLAIM = "claim"
    RELEASE = "release"
    CORRECT = "correct"
    ACCEPT = "accept"
    URGENT = "urgent"
    VALIDATE = "validate"


def audited(
    session: Session, user: str, action: Action, annotation: Annotation, at: datetime
) -> None:
    """Record `action` on `annotation` in `session`'s transaction."""
    session.add(
        AuditEvent(
            at=at,
            user_name=user,
            action=action.value,
            study_id=annotation.study_id,
            annotation_id=annotation.id,
        )
    )


class AuditLog:
    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.clock = clock
        # (user, study UID) -> when its view was last recorded: spares the database the
        # viewer's other requests. Only an optimisation; the rows are the log.
        self._viewed: dict[tuple[str, str], datetime] = {}

    def record(self, user: str, action: Action, annotation_id: int) -> None:
        with self.store.transaction() as session:
            annotation = session.get(Annotation, annotation_id)
            if annotation is not None:
                audited(session, user, action, annotation, self.clock())

    def viewed(self, user: str, study_uid: str) -> None:
        """`user` read `study_uid`'s images (nothing recorded for a study radloop never
        received: it has no internal id)."""
        now = self.clock()
        last = self._viewed.get((user, study_uid))
        if last is not None and now - last < VIEW_WINDOW:
            return
        with self.store.transaction() as session:
            study_id = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
            if study_id is None:
                return
            session.add(
                AuditEvent(at=now, user_name=user, action=Action.VIEW.value, study_id=study_id)
            )
        if len(self._viewed) > 10_000:
            self._viewed = {k: t for k, t in self._viewed.items() if now - t < VIEW_WINDOW}
        self._viewed[(user, study_uid)] = now

    def events(
        self,
        user: str | None = None,
        study_id: int | None = None,
        since: datetime | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """The newest `limit` events, newest first."""
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if user is not None:
            query = query.where(AuditEvent.user_name == user)
        if study_id is not None:
            query = query.where(AuditEvent.study_id == study_id)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        with self.store.read() as session:
            return [
                {
                    "id": e.id,
                    "at": e.at.isoformat(),
                    "user": e.user_name,
                    "action": e.action,
                    "study_id": e.study_id,
                    "annotation_id": e.annotation_id,
                }
                for e in session.scalars(query)
            ]
