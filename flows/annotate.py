"""Annotation as a Prefect background task, run by warm `radloop worker --queue annotate`
processes: every completed study revision gets a case from every model spec.

The outbox dispatcher submits each planned job (`agents.jobs`) with `submit_annotation`; a
worker that receives it takes the job (unless another live worker holds it), runs the
idempotent `Annotator` with the clients, specs and imports it loaded once at start, and records
the outcome. Outages (Triton, Orthanc, the disk) are retried with backoff as Prefect task
retries (`annotation.retries`), visible in Prefect's UI; a draft that cannot be made — bad
input, or an outage that outlasts the retries — still leaves the study on the worklist: the
task queues it without a draft, with the reason. Parameters are the job key and the
submission's number: UIDs and names, never patient data.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prefect import task
from prefect.runtime import task_run
from pyorthanc import Orthanc

from agents.annotator import Annotator, failure_reason
from agents.jobs import AnnotationJobs, JobRef
from agents.viewer_store import ViewerStoreUnavailable
from flows.process import process_start, this_host
from model_registry.inference import InferenceUnavailable, TritonBackend
from model_registry.repository import model_repository
from radloop.db import Store
from radloop.modelspec import ModelSpec, load_specs
from radloop.settings import Settings, load_settings

log = logging.getLogger(__name__)

RETRYABLE = (InferenceUnavailable, ViewerStoreUnavailable, httpx.HTTPError, OSError)


def build_annotator(settings: Settings, store: Store) -> Annotator:
    orthanc = settings.orthanc
    return Annotator(
        store,
        settings.spool_dir,
        settings.drafts_dir,
        model_repository(settings),
        TritonBackend(settings.triton.base_url, settings.triton.timeout_seconds),
        Orthanc(
            orthanc.base_url,
            orthanc.username,
            orthanc.password.get_secret_value() if orthanc.password else None,
            timeout=60.0,
        ),
    )


def worker_id() -> str:
    """host:pid:<process start>: a later process that gets the same pid is another worker."""
    pid = os.getpid()
    return f"{this_host()}:{pid}:{(process_start(pid) or '').rpartition(':')[2]}"


@dataclass
class Warm:
    """What an annotation worker builds once and keeps between studies."""

    settings: Settings
    store: Store
    specs: dict[str, ModelSpec]
    annotator: Annotator
    jobs: AnnotationJobs
    triton: TritonBackend
    worker: str = field(default_factory=worker_id)
    in_flight: set[str] = field(default_factory=set)
    # Jobs whose run waits for its next attempt (a retry after an outage), with the monotonic
    # time by which that attempt must have started: the worker keeps their leases meanwhile,
    # else a retry delay longer than the lease would have the job submitted again.
    awaiting_retry: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # tritonclient's HTTP client is not thread-safe, and a load takes seconds: one at a time.
    loading: threading.Lock = field(default_factory=threading.Lock)

    def holding(self) -> list[str]:
        """The jobs whose leases this worker renews: those it drafts, and those whose retry
        is due soon (one the engine never retried is let go at its deadline)."""
        now = time.monotonic()
        with self.lock:
            self.awaiting_retry = {k: due for k, due in self.awaiting_retry.items() if due > now}
            return sorted(self.in_flight | set(self.awaiting_retry))

    def serve_champions(self, wait: bool = True) -> None:
        """Make this worker's Triton serve each model's champion. The training worker loads a
        new version on the Triton it is configured with and moves the pointer in the shared
        repository; every other GPU server's worker loads it here (every few seconds, and
        after a draft found it missing), so adding a GPU server needs no list of Tritons. With
        `wait` False, return at once if another thread is loading."""
        if not self.loading.acquire(blocking=wait):
            return
        try:
            repository = self.annotator.repository
            for name in self.specs:
                champion = repository.champion(name)
                if champion is None or self.triton.ready(name, str(champion)):
                    continue
                log.info("loading %s v%d on this worker's Triton", name, champion)
                self.triton.load(name)  # the repository's config.pbtxt names the versions
        finally:
            self.loading.release()


@functools.cache
def warm() -> Warm:
    """This process's worker state, built on first use (`radloop worker` builds it at start,
    before it takes a run)."""
    settings = load_settings()
    store = Store.open(settings.effective_database_url)
    return Warm(
        settings,
        store,
        load_specs(settings.effective_models_dir, networks=False),  # it never builds one
        build_annotator(settings, store),
        AnnotationJobs(store, settings.annotation.job_lease_seconds),
        TritonBackend(settings.triton.base_url, settings.triton.timeout_seconds),
    )


@task(name="annotate-study", task_run_name="annotate {job_key} (submission {submission})")
def annotate_study(job_key: str, submission: int) -> dict[str, Any]:
    """Draft the study revision of job `job_key` with its model, once."""
    state = warm()
    job = state.jobs.start(job_key, state.worker, task_run.get_id())
    if job is None:
        return {"job": job_key, "skipped": "done, or being drafted by another worker"}
    with state.lock:
        state.in_flight.add(job_key)
        state.awaiting_retry.pop(job_key, None)
    try:
        return _annotate(state, job)
    finally:
        with state.lock:
            state.in_flight.discard(job_key)


def _annotate(state: Warm, job: JobRef) -> dict[str, Any]:
    spec = state.specs.get(job.model)
    if spec is None:
        raise LookupError(f"no model spec {job.model!r} on worker {state.worker}")
    error = None
    try:
        outcome = state.annotator.annotate(job.study_uid, job.revision, spec)
    except Exception as failure:
        runs = int(task_run.get_run_count() or 1)
        if isinstance(failure, RETRYABLE) and runs <= state.settings.annotation.retries:
            if isinstance(failure, InferenceUnavailable):
                _reload_champions(state)  # this host's Triton lost it (restarted, unloaded)
            with state.lock:
                state.awaiting_retry[job.key] = time.monotonic() + retry_wait(state.settings, runs)
            raise  # Prefect retries the run after its delay
        error = failure_reason(failure)
        outcome = state.annotator.queue_failed(job.study_uid, job.revision, spec, error)
    state.jobs.finish(job.key, outcome, error)
    return {"job": job.key, "annotation_id": outcome.annotation_id, "state": outcome.state.value}


def _reload_champions(state: Warm) -> None:
    try:
        state.serve_champions()
    except Exception as error:  # Triton itself is away: the retry will say so
        log.warning("could not reload the champions on this worker's Triton: %r", error)


RETRY_JITTER = 0.5  # Prefect spreads each delay over ±50 %


def retry_delays(settings: Settings) -> list[float]:
    """The delay before each retry, doubling from `annotation.retry_delay_seconds`."""
    delay = settings.annotation.retry_delay_seconds
    return [delay * 2**n for n in range(settings.annotation.retries)]


def retrying(settings: Settings) -> Any:
    """The task as workers run it: retries and their backoff from settings (the task key is
    the function's, so submitters need not know them)."""
    return annotate_study.with_options(
        retries=settings.annotation.retries,
        retry_delay_seconds=retry_delays(settings) or 0,
        retry_jitter_factor=RETRY_JITTER,
    )


def retry_wait(settings: Settings, runs: int) -> float:
    """The longest Prefect may wait after attempt `runs` failed before it starts the next,
    plus a margin for the engine to start it."""
    delay = retry_delays(settings)[runs - 1]
    return delay * (1 + RETRY_JITTER) + settings.annotation.job_lease_seconds


def submit_annotation(job: JobRef) -> str:
    """Submit job `job` as a background task; return its Prefect task run id. A previous
    submission that a worker had started and then left (killed) is marked Crashed, so Prefect's
    UI does not show it running forever."""
    if job.previous_run_id and job.previous_running:
        _crash(job.previous_run_id, f"radloop: its worker stopped; {job.key} submitted again")
    future = annotate_study.delay(job.key, job.attempt)
    return str(future.task_run_id)


def _crash(run_id: str, message: str) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(UUID(run_id), Crashed(message=message), force=True)
    except Exception as error:  # only the UI's view of an old run: never hold up the new one
        log.debug("could not mark task run %s crashed: %r", run_id, error)
