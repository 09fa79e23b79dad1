"""PostgreSQL killed (kill -9, postmaster and backends) under the review service while a reader
works, then started again (crash recovery from its WAL): meanwhile each request that needs the
database is answered 503 with the reason and a Retry-After — not a 500, not a hang — and a
save sent then changes nothing; once PostgreSQL is back the same service process takes the
save, once."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from radloop.app.supervisor import Child
from radloop.app.supervisor.specs import review_spec
from radloop.db import Annotation, OutboxEvent
from radloop.events import EventType
from tests.conftest_marks import ONCE
from tests.review_cases import Review
from tests.servers import PostgresServer

pytestmark = pytest.mark.slow


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="radloop-pg-")))  # postgres can reach
    server.start()
    yield server
    server.stop()


@pytest.fixture
def database_url(own_postgres: PostgresServer) -> str:
    """conftest's, on a PostgreSQL of this test's own, which it may kill."""
    return own_postgres.create_database("radloop")


@ONCE  # its own PostgreSQL, so it can kill it: the SQLite pass runs it once
@pytest.mark.timeout(300)
def test_with_postgresql_killed_the_review_service_answers_503_and_takes_the_save_once_back(
    review: Review, own_postgres: PostgresServer
) -> None:
    service = Child(review_spec(review.settings))
    service.start()
    url = review.settings.review.local_url
    as_ann = {"authorization": f"Bearer {review.tokens['ann']}"}
    try:
        service.wait_healthy()
        case, study = review.drafted(95)
        claim = httpx.post(f"{url}/api/annotations/{case}/claim", headers=as_ann, timeout=60)
        assert claim.status_code == 200, claim.text
        upload = study.truth.read_bytes()

        own_postgres.kill()
        for method, path, content in (
            ("PUT", f"/api/annotations/{case}/label", upload),
            ("GET", "/api/worklist", None),
        ):
            answer = httpx.request(method, url + path, content=content, headers=as_ann, timeout=60)
            assert answer.status_code == 503, (path, answer.status_code, answer.text)
            assert "database is unavailable" in answer.json()["detail"]
            assert answer.headers["retry-after"] == "5"

        own_postgres.resume()  # crash recovery first
        saved = httpx.put(
            f"{url}/api/annotations/{case}/label", content=upload, headers=as_ann, timeout=60
        )
        assert saved.status_code == 200, saved.text
    finally:
        service.stop()
    with review.store.read() as session:
        state = session.get_one(Annotation, case).state
        events = session.scalars(
            select(OutboxEvent).where(
                OutboxEvent.event == EventType.ANNOTATION_CORRECTED.value,
                OutboxEvent.resource_id == f"radloop.annotation.{case}",
            )
        ).all()
    assert state == "corrected" and len(events) == 1
