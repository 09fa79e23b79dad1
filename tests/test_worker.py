"""Warm annotation on real parts: `radloop listen` submits each completed study to `radloop
worker` processes (Prefect background tasks) that draft it with Triton; a worker SIGKILLed in
the middle of a study leaves it to the other one, drafted once; a Prefect server restarted
while a run waits for a worker loses nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from sqlalchemy import func, select

from model_registry.inference import TritonBackend
from radloop.app.phantoms import write_study
from radloop.app.supervisor import Child
from radloop.db import Annotation, AnnotationJob, Store, Study
from radloop.domain import JobState
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.models import export_version
from tests.servers import RadloopProcess, radloop_json
from tests.test_scp import storescu

pytestmark = pytest.mark.slow

LEASE_SECONDS = "4"


@pytest.fixture
def env(
    radloop_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    extra = {
        "RADLOOP_ANNOTATION__JOB_LEASE_SECONDS": LEASE_SECONDS,
        "RADLOOP_ANNOTATION__RETRIES": "2",
        "RADLOOP_ANNOTATION__RETRY_DELAY_SECONDS": "0.5",
        "RADLOOP_ANNOTATION__WORKER_CONCURRENCY": "1",
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
    }
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    return {**radloop_env, **extra}


def push(env: dict[str, str], tmp_path: Path, seed: int) -> str:
    study = write_study(tmp_path / "phantoms", seed, seed=seed)
    assert storescu(env, sorted(study.dicom_dir.glob("*.dcm"))).returncode == 0
    return study.study_uid


def job_of(store: Store, study_uid: str) -> AnnotationJob | None:
    with store.read() as session:
        return session.scalars(
            select(AnnotationJob).where(AnnotationJob.study_uid == study_uid)
        ).first()


def drafts_of(store: Store, study_uid: str) -> int:
    with store.read() as session:
        return int(
            session.scalar(
                select(func.count(Annotation.id))
                .join(Study, Study.id == Annotation.study_id)
                .where(Study.study_uid == study_uid, Annotation.seg_sop_instance_uid.is_not(None))
            )
            or 0
        )


def queue_row(env: dict[str, str], study_uid: str) -> dict[str, Any] | None:
    for row in radloop_json(env, "queue", "list"):
        if row["study_uid"] == study_uid and row["state"] == "drafted":
            return dict(row)
    return None


def workers(env: dict[str, str]) -> list[dict[str, Any]]:
    report = radloop_json(env, "status", exit_codes=(0, 1))
    return list(report["workers"])


@pytest.mark.timeout(600)
@ONCE  # processes and Prefect; the jobs' SQL runs on PostgreSQL in test_jobs
def test_workers_draft_warm_a_killed_worker_hands_over_and_a_prefect_restart_loses_nothing(
    env: dict[str, str],
    settings: Settings,
    store: Store,
    orthanc: Child,
    triton: Child,
    prefect_server: Child,
    tmp_path: Path,
) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    TritonBackend(settings.triton.base_url).load(spec.name)
    gpu1 = RadloopProcess(env, ("worker", "--queue", "annotate"), name="worker-1").launch()
    gpu2 = RadloopProcess(env, ("worker", "--queue", "annotate"), name="worker-2").launch()
    listener = RadloopProcess(env).start()
    try:
        wait_until(lambda: len(workers(env)) == 2, timeout=120, interval=1)
        assert {w["pid"] for w in workers(env)} == {gpu1.pid, gpu2.pid}
        assert {w["queue"] for w in workers(env)} == {"annotate"}

        # A study completes and is drafted by a worker that is already warm.
        first = push(env, tmp_path, seed=1)
        row = wait_until(lambda: queue_row(env, first), timeout=120, interval=0.5)
        assert row["completed_at"] and row["drafted_at"] and row["completed_at"] < row["drafted_at"]
        assert set(row["timings"]) >= {"load_s", "infer_s", "write_s", "store_s"}
        started = "Starting task worker"
        assert started in gpu1.output() and started in gpu2.output()

        # The worker drafting the next study is killed in the middle of it: the other one
        # drafts it once its lease ran out, exactly once.
        second = push(env, tmp_path, seed=2)

        def running() -> AnnotationJob | None:
            job = job_of(store, second)
            return job if job is not None and job.state == JobState.RUNNING else None

        taken = wait_until(running, timeout=120, interval=0.05)
        victim, survivor = (gpu1, gpu2) if f":{gpu1.pid}:" in str(taken.worker) else (gpu2, gpu1)
        assert f":{victim.pid}:" in str(taken.worker)
        victim.kill()
        wait_until(lambda: queue_row(env, second), timeout=120, interval=0.5)
        done = job_of(store, second)
        assert done is not None and done.state == JobState.DONE and done.attempts >= 2
        assert f":{survivor.pid}:" in str(done.worker)
        assert drafts_of(store, second) == 1
        with get_client(sync_client=True) as client:  # Prefect's UI shows the first run ended
            assert taken.task_run_id is not None
            crashed = client.read_task_run(UUID(taken.task_run_id)).state
            assert crashed is not None and crashed.type == StateType.CRASHED
        wait_until(lambda: len(workers(env)) == 1, timeout=60, interval=1)

        # No worker connected: a study's run waits in Prefect, which restarts (and forgets
        # it). A worker that connects afterwards still drafts it.
        assert survivor.stop() == 0
        third = push(env, tmp_path, seed=3)
        wait_until(lambda: getattr(job_of(store, third), "task_run_id", None), timeout=60)
        prefect_server.stop()
        prefect_server.start()
        prefect_server.wait_healthy()
        late = RadloopProcess(env, ("worker", "--queue", "annotate"), name="worker-3").launch()
        try:
            wait_until(lambda: queue_row(env, third), timeout=180, interval=1)
            assert drafts_of(store, third) == 1 and drafts_of(store, first) == 1
        finally:
            late.stop()
    finally:
        listener.stop()
        gpu1.stop()
        gpu2.stop()
