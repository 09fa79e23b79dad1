"""Annotation jobs: the durable record of each wanted draft, and the workers that make them.

Prefect's background tasks are radloop's warm execution (a long-lived worker keeps its imports,
clients and specs), but they are at most once: a worker killed after it took a run leaves it
Running forever, runs waiting while no worker is connected vanish when the API restarts, and
`delay()` has no idempotency key. So the wanted work lives here, one row per study revision ×
model × the version serving when the revision completed (`job_key`):

* the outbox dispatcher `plan`s the jobs of each `study.completed` event (idempotent), and
  `submit_due` submits every job whose lease is over — new ones at once, and again any whose
  submission was never started (backing off) or whose worker stopped renewing it (killed);
* a worker `start`s a job only if no other live worker holds it, renews its lease while it
  works (`renew`), and `finish`es it with the annotator's outcome. The annotator itself is
  exactly once per study revision and model (its `draft_key`), so a job run twice after a
  lease ran out still leaves one draft.

`WorkerRegistry` is where each `radloop worker` reports itself (host, queue, pid, last seen):
`radloop status` lists them and `radloop up` knows its worker is connected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from radloop.db import AnnotationJob, Store, Worker, utcnow
from radloop.domain import JobState, WorkerQueue, draft_key
from radloop.events import EventType, StudyCompleted

if TYPE_CHECKING:
    from agents.annotator import Outcome

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# Longest wait before a submitted job that no worker started is submitted again.
MAX_WAIT = timedelta(minutes=10)


@dataclass(frozen=True)
class JobRef:
    """What a submission or a worker needs of a job: no patient data, UIDs and names only."""

    key: str
    study_uid: str
    revision: int
    model: str
    model_version: str | None
    attempt: int
    # The Prefect task run of the previous submission, and whether a worker had started it.
    previous_run_id: str | None = None
    previous_running: bool = False


def _ref(row: AnnotationJob, previous_run_id: str | None = None, running: bool = False) -> JobRef:
    return JobRef(
        row.job_key,
        row.study_uid,
        row.revision,
        row.model_name,
        row.model_version,
        row.attempts,
        previous_run_id,
        running,
    )


class AnnotationJobs:
    def __init__(self, store: Store, lease_seconds: float, clock: Clock = utcnow) -> None:
        self.store = store
        self.lease = timedelta(seconds=lease_seconds)
        self.clock = clock

    def plan(
        self,
        session: Session,
        study_uid: str,
        revision: int,
        completed_at: datetime,
        serving: Mapping[str, str | None],
    ) -> list[str]:
        """Add, in the caller's transaction, a job per model (name → serving version) for a
        completed study revision; return the keys of those that are new."""
        new = []
        for model, version in serving.items():
            key = draft_key(study_uid, revision, model, version)
            planned = select(AnnotationJob.id).where(
                AnnotationJob.study_uid == study_uid,
                AnnotationJob.revision == revision,
                AnnotationJob.model_name == model,
            )
            if session.scalars(planned).first() is not None:  # also under an older version
                continue
            job = AnnotationJob(
                job_key=key,
                study_uid=study_uid,
                revision=revision,
                model_name=model,
                model_version=version,
                state=JobState.SUBMITTED.value,
                attempts=0,
                lease_until=completed_at,  # due at once
                completed_at=completed_at,
            )
            try:
                with session.begin_nested():
                    session.add(job)
            except IntegrityError:  # another dispatcher planned it a moment ago
                continue
            new.append(key)
        return new

    def submit_due(self, submit: Callable[[JobRef], str], limit: int = 50) -> int:
        """Submit (again) every job whose lease is over; return how many were submitted.

        Jobs are claimed with their next lease in a short transaction, then submitted outside
        it: a dispatcher that dies in between leaves them to the next one after the lease. A
        submission that fails (Prefect unreachable) is tried again after a short wait."""
        now = self.clock()
        with self.store.transaction() as session:
            rows = session.scalars(
                select(AnnotationJob)
                .where(AnnotationJob.state != JobState.DONE, AnnotationJob.lease_until <= now)
                .order_by(AnnotationJob.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            refs = []
            for row in rows:
                running = row.state == JobState.RUNNING
                if running or row.attempts:
                    log.warning(
                        "job %s: %s; submitting it again",
                        row.job_key,
                        f"worker {row.worker} stopped renewing it"
                        if running
                        else "no worker started it",
                    )
                row.attempts += 1
                row.state = JobState.SUBMITTED.value
                row.submitted_at = now
                row.lease_until = now + min(MAX_WAIT, self.lease * 2 ** (row.attempts - 1))
                refs.append(_ref(row, row.task_run_id, running))
        submitted = 0
        for ref in refs:
            try:
                run_id = submit(ref)
            except Exception as error:
                log.warning("job %s: submission failed (%r); trying again", ref.key, error)
                self._retry_soon(ref)
                continue
            submitted += 1
            with self.store.transaction() as session:
                found = self._row(session, ref.key)
                # A worker that already started it recorded the run itself.
                if (
                    found is not None
                    and found.attempts == ref.attempt
                    and found.state == JobState.SUBMITTED
                ):
                    found.task_run_id = run_id
        return submitted

    def _retry_soon(self, ref: JobRef) -> None:
        with self.store.transaction() as session:
            row = self._row(session, ref.key)
            if row is not None and row.attempts == ref.attempt:
                row.lease_until = self.clock() + timedelta(seconds=2)

    @staticmethod
    def _row(session: Session, key: str) -> AnnotationJob | None:
        return session.scalars(select(AnnotationJob).where(AnnotationJob.job_key == key)).first()

    def start(self, key: str, worker: str, task_run_id: str | None) -> JobRef | None:
        """Take job `key` for `worker`; None when it is done, unknown, or held by another
        worker whose lease still runs."""
        now = self.clock()
        with self.store.transaction() as session:
            row = self._row(session, key)
            if row is None or row.state == JobState.DONE:
                return None
            if row.state == JobState.RUNNING and row.worker != worker and row.lease_until > now:
                return None
            row.state = JobState.RUNNING.value
            row.worker = worker
            row.started_at = now
            row.lease_until = now + self.lease
            if task_run_id is not None:
                row.task_run_id = task_run_id
            return _ref(row)

    def renew(self, keys: Iterable[str], worker: str) -> list[str]:
        """Extend the leases `worker` holds on `keys`; return the keys it no longer holds."""
        keys = list(keys)
        if not keys:
            return []
        now = self.clock()
        with self.store.transaction() as session:
            rows = session.scalars(
                select(AnnotationJob).where(AnnotationJob.job_key.in_(keys))
            ).all()
            held = set()
            for row in rows:
                if row.state == JobState.RUNNING and row.worker == worker:
                    row.lease_until = now + self.lease
                    held.add(row.job_key)
        return [key for key in keys if key not in held]

    def finish(self, key: str, outcome: Outcome, error: str | None = None) -> None:
        """Record the annotator's outcome; the job is never submitted again."""
        with self.store.transaction() as session:
            row = self._row(session, key)
            if row is None or row.state == JobState.DONE:
                return
            row.state = JobState.DONE.value
            row.annotation_id = outcome.annotation_id
            row.outcome = outcome.state.value
            row.last_error = error
            row.finished_at = self.clock()


class JobPlanner:
    """The outbox dispatcher's part in annotation: plan the jobs of each completed study
    revision in the transaction that claims its event, then submit what is due."""

    def __init__(
        self,
        jobs: AnnotationJobs,
        serving: Callable[[], Mapping[str, str | None]],
        submit: Callable[[JobRef], str],
    ) -> None:
        self.jobs = jobs
        self.serving = serving
        self.submit = submit

    def plan(
        self, session: Session, event: str, payload: Mapping[str, object], at: datetime
    ) -> None:
        if event != EventType.STUDY_COMPLETED:
            return
        completed = StudyCompleted.model_validate(payload)
        new = self.jobs.plan(session, completed.study_uid, completed.revision, at, self.serving())
        if new:
            log.info(
                "planned %d annotation job(s) for study %s rev %d",
                len(new),
                completed.study_uid,
                completed.revision,
            )

    def submit_due(self) -> int:
        return self.jobs.submit_due(self.submit)


def heartbeat_seconds(lease_seconds: float) -> float:
    """How often workers report themselves and renew their leases: a quarter of the lease."""
    return min(15.0, max(0.5, lease_seconds / 4))


def connected_window(lease_seconds: float) -> timedelta:
    """A worker not heard from within three heartbeats counts as gone."""
    return timedelta(seconds=3 * heartbeat_seconds(lease_seconds) + 2)


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    queue: WorkerQueue
    started_at: datetime
    last_seen_at: datetime


class WorkerRegistry:
    def __init__(self, store: Store, clock: Clock = utcnow) -> None:
        self.store = store
        self.clock = clock

    def beat(
        self, worker: str, host: str, pid: int, queue: WorkerQueue, started_at: datetime
    ) -> None:
        with self.store.transaction() as session:
            row = session.get(Worker, worker)
            if row is None:
                row = Worker(
                    id=worker, host=host, pid=pid, queue=queue.value, started_at=started_at
                )
                session.add(row)
            row.last_seen_at = self.clock()

    def leave(self, worker: str) -> None:
        with self.store.transaction() as session:
            session.execute(delete(Worker).where(Worker.id == worker))

    def seen_within(self, window: timedelta) -> list[WorkerInfo]:
        """Workers that reported themselves within `window`, newest first; older rows (killed
        workers) are removed."""
        since = self.clock() - window
        with self.store.transaction() as session:
            session.execute(delete(Worker).where(Worker.last_seen_at < since - window))
            rows = session.scalars(
                select(Worker)
                .where(Worker.last_seen_at >= since)
                .order_by(Worker.started_at.desc())
            ).all()
            return [
                WorkerInfo(r.id, r.host, r.pid, WorkerQueue(r.queue), r.started_at, r.last_seen_at)
                for r in rows
            ]
