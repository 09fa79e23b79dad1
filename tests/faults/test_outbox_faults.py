"""The outbox dispatcher killed (kill -9, with the `radloop listen` that runs it) at its worst
moment: Prefect has taken a batch of events and the dispatcher dies before it records the
delivery. Started again, it sends the batch again once its lease is over; Prefect keeps each
event once (by the id it was given when written), and the study's annotation job, planned in
the transaction that claimed the event, stays one job."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from radloop.app.supervisor import Child
from radloop.db import AnnotationJob, Store
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.dicom_files import generated_ct
from tests.proxy import CuttingProxy
from tests.servers import RadloopProcess
from tests.test_outbox import outbox, prefect_events
from tests.test_scp import storescu

# A real Prefect server.
pytestmark = pytest.mark.slow


def test_a_dispatcher_killed_before_it_records_a_delivery_sends_it_again_and_prefect_keeps_one(
    radloop_env: dict[str, str],
    settings: Settings,
    store: Store,
    prefect_server: Child,
    tmp_path: Path,
) -> None:
    api = settings.prefect.effective_api_url
    listener: RadloopProcess | None = None

    def events_taken(method: str, path: str, status: int) -> bool:
        return method == "POST" and path == "/api/events" and status < 300

    def kill_dispatcher() -> None:
        assert listener is not None
        listener.kill()

    proxy = CuttingProxy(prefect_server.spec.url, events_taken, kill_dispatcher).start()
    env = {
        **radloop_env,
        "RADLOOP_PREFECT__API_URL": f"{proxy.url}/api",
        "RADLOOP_OUTBOX__LEASE_SECONDS": "3",
    }
    listener = RadloopProcess(env).start()
    try:
        study = generated_ct(tmp_path / "a", 3, seed=1)
        assert storescu(env, study).returncode == 0
        wait_until(proxy.cut.is_set, timeout=60)
        assert not listener.process.alive()
        (row,) = outbox(store)
        assert row.delivered_at is None and row.attempts == 0  # Prefect has it; no one knows
        (event,) = wait_until(lambda: prefect_events(api), timeout=30)
        assert event["id"] == row.event_id

        proxy.heal()
        listener = RadloopProcess(env).start()
        wait_until(lambda: outbox(store)[0].delivered_at is not None, timeout=60)
        (row,) = outbox(store)
        assert row.attempts == 1 and row.last_error is None
        # Sent twice, kept once.
        assert [e["id"] for e in prefect_events(api)] == [row.event_id]
        with store.read() as session:
            jobs = session.scalars(select(AnnotationJob.study_uid)).all()
        assert jobs == [str(dcmread(study[0]).StudyInstanceUID)]
    finally:
        listener.stop()
        proxy.stop()
