"""Outbox → Prefect: a real Prefect server, down, up, killed and back; no event lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy import select

from radloop.app.supervisor import Child, prefect_spec
from radloop.db import OutboxEvent, Store
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.dicom_files import generated_ct
from tests.servers import RadloopProcess
from tests.test_scp import storescu

# A real Prefect server.
pytestmark = pytest.mark.slow


def prefect_events(api: str) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{api}/events/filter",
        json={"filter": {"event": {"name": ["radloop.study.completed"]}}, "limit": 50},
        timeout=10,
    )
    response.raise_for_status()
    return list(response.json()["events"])


def outbox(store: Store) -> list[OutboxEvent]:
    with store.transaction() as session:
        return list(session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)))


def test_events_wait_while_prefect_is_down_and_arrive_once_it_is_back(
    radloop_env: dict[str, str], settings: Settings, store: Store, tmp_path: Path
) -> None:
    api = settings.prefect.effective_api_url
    listener = RadloopProcess(radloop_env).start()
    prefect = Child(prefect_spec(settings))
    try:
        first = generated_ct(tmp_path / "a", 3, seed=1)
        assert storescu(radloop_env, first).returncode == 0
        wait_until(lambda: [r for r in outbox(store) if r.attempts >= 2], timeout=30)
        (row,) = outbox(store)
        assert row.delivered_at is None and "ConnectError" in (row.last_error or "")

        prefect.start()
        prefect.wait_healthy()
        wait_until(lambda: outbox(store)[0].delivered_at is not None, timeout=30)
        (event,) = wait_until(lambda: prefect_events(api), timeout=30)
        assert event["id"] == row.event_id
        assert event["resource"]["prefect.resource.id"] == row.resource_id
        assert event["payload"]["study_uid"] == str(dcmread(first[0]).StudyInstanceUID)

        # Prefect dies without warning; a study completes meanwhile; Prefect comes back.
        prefect.kill()
        second = generated_ct(tmp_path / "b", 2, seed=2)
        assert storescu(radloop_env, second).returncode == 0
        wait_until(lambda: len(outbox(store)) == 2 and outbox(store)[1].attempts >= 1, timeout=30)
        assert outbox(store)[1].delivered_at is None
        prefect.start()
        prefect.wait_healthy()
        wait_until(lambda: all(r.delivered_at for r in outbox(store)), timeout=30)
        events = wait_until(
            lambda: prefect_events(api) if len(prefect_events(api)) == 2 else None, 30
        )
        assert {e["id"] for e in events} == {r.event_id for r in outbox(store)}
    finally:
        listener.stop()
        prefect.stop()
