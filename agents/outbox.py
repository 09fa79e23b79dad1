"""Deliver outbox rows to Prefect's event API, at least once, in order of creation.

A row is marked delivered only after Prefect answered 2xx. While Prefect is down or restarting
rows wait with exponential backoff; nothing is dropped. Each event keeps the id it was given
when written, so a redelivered event is the same event to Prefect and to idempotent consumers.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select

from agents.jobs import JobPlanner
from radloop.db import OutboxEvent, Store, utcnow

log = logging.getLogger(__name__)


def to_prefect_event(row: OutboxEvent) -> dict[str, Any]:
    return {
        "id": row.event_id,
        "occurred": row.created_at.isoformat(),
        "event": row.event,
        "resource": {
            "prefect.resource.id": row.resource_id,
            "radloop.idempotency-key": row.idempotency_key,
        },
        "related": [],
        "payload": row.payload,
    }


class OutboxDispatcher:
    def __init__(
        self,
        store: Store,
        api_url: str,
        batch_size: int = 100,
        max_backoff_seconds: float = 60.0,
        lease_seconds: float = 60.0,
        client: httpx.Client | None = None,
        planner: JobPlanner | None = None,
    ) -> None:
        self.store = store
        self.api_url = api_url.rstrip("/")
        self.batch_size = batch_size
        self.max_backoff = max_backoff_seconds
        # A claimed batch is sent again by anyone after this, should its dispatcher die
        # mid-request: Prefect dedups events by id, so the event counts once.
        self.lease = timedelta(seconds=lease_seconds)
        self.client = client or httpx.Client(timeout=httpx.Timeout(20.0, connect=3.0))
        self.planner = planner
        self._wakeup = threading.Event()

    def wake(self) -> None:
        """Dispatch now rather than at the next poll (a study just completed)."""
        self._wakeup.set()

    def dispatch_once(self) -> int:
        """Send one batch of due rows; return how many were delivered.

        Rows are claimed with a lease (their next attempt moved past the request timeout) in a
        short transaction, so no database lock is held while Prefect is being called and a
        second dispatcher never sends the same batch concurrently.
        """
        now = utcnow()
        with self.store.transaction() as session:
            rows = session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.delivered_at.is_(None), OutboxEvent.next_attempt_at <= now)
                .order_by(OutboxEvent.id)
                .limit(self.batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                row.next_attempt_at = now + self.lease
                if self.planner is not None:
                    self.planner.plan(session, row.event, row.payload, row.created_at)
            events = [to_prefect_event(row) for row in rows]
            ids = [row.id for row in rows]
        if self.planner is not None:
            self.planner.submit_due()  # new jobs first: a study waits on nothing else
        if not ids:
            return 0
        error: str | None = None
        try:
            response = self.client.post(f"{self.api_url}/events", json=events)
            response.raise_for_status()
        except httpx.HTTPStatusError as failure:
            error = f"HTTP {failure.response.status_code}: {failure.response.text[:300]}"
        except httpx.HTTPError as failure:
            error = f"{type(failure).__name__}: {failure}"
        finished = utcnow()
        with self.store.transaction() as session:
            for row in session.scalars(select(OutboxEvent).where(OutboxEvent.id.in_(ids))):
                row.attempts += 1
                if error is None:
                    row.delivered_at, row.last_error = finished, None
                else:
                    backoff = min(self.max_backoff, 0.5 * 2 ** min(row.attempts, 16))
                    row.next_attempt_at = finished + timedelta(seconds=backoff)
                    row.last_error = error
        if error is not None:
            log.warning("outbox: %d event(s) not delivered to Prefect (%s)", len(ids), error)
            return 0
        log.info("outbox: delivered %d event(s) to Prefect", len(ids))
        return len(ids)

    def run(self, stop: threading.Event, poll_seconds: float = 0.5) -> None:
        while not stop.is_set():
            self._wakeup.clear()  # before the batch: a wake during it is not lost
            try:
                if self.dispatch_once() == self.batch_size:
                    continue
            except Exception:
                log.exception("outbox dispatch failed; retrying")
            self._wakeup.wait(poll_seconds)
