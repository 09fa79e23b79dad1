"""Annotation jobs, the durable record behind at-most-once background tasks: planned once per
study revision and model, submitted at once, submitted again when nobody started them or their
worker stopped renewing them, held by one live worker at a time, never submitted once done."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from agents.annotator import Outcome
from agents.jobs import AnnotationJobs, JobRef, WorkerRegistry
from radloop.db import AnnotationJob, Store, utcnow
from radloop.domain import AnnotationState, JobState, WorkerQueue

STUDY = "1.2.826.0.1.3680043.8.498.1"
LEASE = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Submissions:
    """What was submitted to Prefect, in order; `failing` makes the next submissions fail."""

    def __init__(self) -> None:
        self.refs: list[JobRef] = []
        self.failing = False

    def __call__(self, ref: JobRef) -> str:
        if self.failing:
            raise ConnectionError("Prefect is restarting")
        self.refs.append(ref)
        return f"00000000-0000-0000-0000-{len(self.refs):012d}"


def plan(store: Store, jobs: AnnotationJobs, serving: dict[str, str | None]) -> list[str]:
    with store.transaction() as session:
        return jobs.plan(session, STUDY, 1, jobs.clock(), serving)


def job(store: Store) -> AnnotationJob:
    with store.read() as session:
        return session.scalars(select(AnnotationJob)).one()


def test_a_completed_revision_is_planned_once_per_model_whatever_serves_later(
    store: Store,
) -> None:
    jobs = AnnotationJobs(store, LEASE)
    assert plan(store, jobs, {"liver": "3", "spleen": None}) == [
        f"study:{STUDY}:rev:1:model:liver:3",
        f"study:{STUDY}:rev:1:model:spleen:none",
    ]
    # The event delivered again, after version 4 was promoted: nothing new.
    assert plan(store, jobs, {"liver": "4", "spleen": None}) == []


def test_a_job_is_submitted_at_once_and_again_only_when_nobody_started_it_in_its_lease(
    store: Store,
) -> None:
    clock, submitted = Clock(), Submissions()
    jobs = AnnotationJobs(store, LEASE, clock)
    plan(store, jobs, {"liver": "3"})
    assert jobs.submit_due(submitted) == 1
    assert job(store).task_run_id == "00000000-0000-0000-0000-000000000001"
    clock.advance(LEASE - 1)
    assert jobs.submit_due(submitted) == 0
    clock.advance(1)  # no worker took it (none connected, or Prefect lost it)
    assert jobs.submit_due(submitted) == 1
    assert [r.attempt for r in submitted.refs] == [1, 2]
    assert not submitted.refs[1].previous_running  # nobody had started it
    clock.advance(LEASE)  # waiting jobs back off: twice the lease now
    assert jobs.submit_due(submitted) == 0
    clock.advance(LEASE)
    assert jobs.submit_due(submitted) == 1


def test_prefect_unreachable_the_submission_is_tried_again_within_seconds(store: Store) -> None:
    clock, submitted = Clock(), Submissions()
    jobs = AnnotationJobs(store, LEASE, clock)
    plan(store, jobs, {"liver": "3"})
    submitted.failing = True
    assert jobs.submit_due(submitted) == 0
    submitted.failing = False
    clock.advance(2)
    assert jobs.submit_due(submitted) == 1
    assert job(store).task_run_id is not None


def test_one_live_worker_holds_a_job_a_killed_one_loses_it_and_a_done_job_stays_done(
    store: Store,
) -> None:
    clock, submitted = Clock(), Submissions()
    jobs = AnnotationJobs(store, LEASE, clock)
    (key,) = plan(store, jobs, {"liver": "3"})
    jobs.submit_due(submitted)

    held = jobs.start(key, "gpu1:100:1", "run-1")
    assert held is not None and (held.study_uid, held.revision, held.model) == (STUDY, 1, "liver")
    assert jobs.start(key, "gpu2:200:1", "run-1-again") is None  # gpu1's lease runs
    clock.advance(LEASE - 1)
    assert jobs.renew([key], "gpu1:100:1") == []  # gpu1 works on and renews
    clock.advance(LEASE - 1)
    assert jobs.submit_due(submitted) == 0

    clock.advance(2)  # gpu1 was killed: no renewal for a whole lease
    assert jobs.submit_due(submitted) == 1
    again = submitted.refs[-1]
    assert again.attempt == 2 and again.previous_running and again.previous_run_id == "run-1"
    assert jobs.start(key, "gpu2:200:1", "run-2") is not None
    assert jobs.renew([key], "gpu1:100:1") == [key]  # had gpu1 only stalled, it knows now

    jobs.finish(key, Outcome(7, AnnotationState.DRAFTED))
    finished = job(store)
    assert (finished.state, finished.annotation_id, finished.outcome) == (
        JobState.DONE,
        7,
        "drafted",
    )
    assert jobs.start(key, "gpu1:100:1", "run-1") is None  # a late delivery does nothing
    clock.advance(10 * LEASE)
    assert jobs.submit_due(submitted) == 0


def test_workers_are_listed_while_they_report_and_forgotten_after(store: Store) -> None:
    clock = Clock()
    registry = WorkerRegistry(store, clock)
    registry.beat("gpu1:100:1", "gpu1", 100, WorkerQueue.ANNOTATE, clock())
    registry.beat("gpu2:200:1", "gpu2", 200, WorkerQueue.ANNOTATE, clock())
    window = timedelta(seconds=30)
    assert {w.host for w in registry.seen_within(window)} == {"gpu1", "gpu2"}
    clock.advance(20)
    registry.beat("gpu2:200:1", "gpu2", 200, WorkerQueue.ANNOTATE, clock())
    clock.advance(20)  # gpu1 went quiet 40 s ago
    assert [w.host for w in registry.seen_within(window)] == ["gpu2"]
    registry.leave("gpu2:200:1")
    assert registry.seen_within(window) == []
