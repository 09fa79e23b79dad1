"""Study completion: explicit, after a quiet period, decided from the database alone.

Timers are not held in memory: a study is due when `last_received_at` is older than the quiet
period, so a restarted listener finds exactly the studies it was waiting on. Completion and its
`radloop.study.completed` outbox row commit in one transaction, once per study revision.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, select

from radloop.db import Instance, Series, Store, Study, utcnow
from radloop.domain import StudyState
from radloop.events import StudyCompleted, record_event

log = logging.getLogger(__name__)


class StudyAssembler:
    def __init__(
        self,
        store: Store,
        quiet_seconds: float,
        on_complete: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.quiet = timedelta(seconds=quiet_seconds)
        # Called after each completion commits: an outbox dispatcher in this process wakes.
        self.on_complete = on_complete

    def complete_due(self, now: datetime | None = None) -> list[StudyCompleted]:
        """Complete every receiving study quiet for at least the quiet period."""
        cutoff = (now or utcnow()) - self.quiet
        with self.store.read() as session:
            due = session.scalars(
                select(Study.study_uid)
                .where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
                .order_by(Study.last_received_at)
            ).all()
        completed = []
        for study_uid in due:
            event = self.complete(study_uid, cutoff=cutoff)
            if event is not None:
                completed.append(event)
        return completed

    def complete(self, study_uid: str, cutoff: datetime | None = None) -> StudyCompleted | None:
        """Complete one study now (or only if quiet since `cutoff`); None if nothing to do."""
        with self.store.transaction() as session:
            query = select(Study).where(
                Study.study_uid == study_uid, Study.state == StudyState.RECEIVING
            )
            if cutoff is not None:
                query = query.where(Study.last_received_at <= cutoff)
            study = session.execute(query.with_for_update(skip_locked=True)).scalar_one_or_none()
            if study is None:
                return None
            instances = session.scalar(
                select(func.count(Instance.id)).where(Instance.study_id == study.id)
            )
            series_uids = session.scalars(
                select(Series.series_uid).where(Series.study_id == study.id).order_by(Series.id)
            ).all()
            study.state = StudyState.COMPLETE.value
            study.completed_at = utcnow()
            payload = StudyCompleted(
                study_id=study.id,
                study_uid=study.study_uid,
                revision=study.revision,
                instances=int(instances or 0),
                series_uids=list(series_uids),
            )
            record_event(session, payload)
        if self.on_complete is not None:
            self.on_complete()
        log.info(
            "study %s revision %d complete: %d instances in %d series",
            payload.study_uid,
            payload.revision,
            payload.instances,
            len(payload.series_uids),
        )
        return payload

    def run(self, stop: threading.Event) -> None:
        """Check for due studies until `stop` is set; errors are logged and retried."""
        interval = min(1.0, self.quiet.total_seconds() / 4)
        while not stop.is_set():
            try:
                self.complete_due()
            except Exception:
                log.exception("study completion check failed; retrying")
            stop.wait(interval)
