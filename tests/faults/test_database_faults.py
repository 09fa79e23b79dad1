"""PostgreSQL killed (kill -9, postmaster and backends), then started again (crash recovery
from its WAL), under the review service and under the annotator:

* while a reader works: each request that needs the database is answered 503 with the reason
  and a Retry-After — not a 500, not a hang — and a save sent then changes nothing; once
  PostgreSQL is back the same service process takes the save, once;
* as a draft's transaction commits (its rows sent, COMMIT next): the draft is not kept, and
  the annotation task's retry after recovery drafts the study once and removes the files the
  cut attempt left;
* as a reader's save commits: the reader is answered 503, the case stays theirs with no
  correction; the save sent again is kept once, and the cut save's files are removed."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Connection, event, func, select
from sqlalchemy.exc import DBAPIError

from radloop.app.supervisor import Child
from radloop.app.supervisor.specs import review_spec
from radloop.db import Annotation, OutboxEvent, Store, Study
from radloop.domain import AnnotationState
from radloop.events import EventType
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings
from tests.conftest_marks import ONCE
from tests.drafted import annotator, received_phantom
from tests.models import export_version
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


@ONCE  # its own PostgreSQL, so it can kill it: the SQLite pass runs it once
@pytest.mark.timeout(300)
def test_postgresql_killed_as_a_draft_commits_keeps_no_draft_and_the_retry_drafts_once(
    store: Store, settings: Settings, own_postgres: PostgresServer, tmp_path: Path
) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=96)
    drafting = annotator(store, settings, None)
    cut = {"drafted": False, "killed": False}

    # Where the kill lands, seen from the annotator's own connection: after the transaction
    # that inserts the draft has sent its statements, before its COMMIT.
    @event.listens_for(store.engine, "after_cursor_execute")
    def drafted(conn: Connection, cursor: object, statement: str, *_: object) -> None:
        cut["drafted"] = cut["drafted"] or statement.startswith("INSERT INTO annotations")

    @event.listens_for(store.engine, "commit")
    def kill_before_commit(conn: Connection) -> None:
        if cut["drafted"] and not cut["killed"]:
            cut["killed"] = True
            own_postgres.kill()

    with pytest.raises(DBAPIError):
        drafting.annotate(study.study_uid, 1, spec)
    assert cut["killed"]
    own_postgres.resume()  # crash recovery: the cut transaction is gone

    with store.read() as session:
        assert not session.scalar(select(func.count()).select_from(Annotation))
    outcome = drafting.annotate(study.study_uid, 1, spec)  # the task's retry
    assert outcome.state == AnnotationState.DRAFTED
    assert drafting.annotate(study.study_uid, 1, spec) == outcome  # and any later one
    with store.read() as session:
        assert session.scalar(select(func.count()).select_from(Annotation)) == 1
        events = session.scalars(
            select(OutboxEvent).where(OutboxEvent.event == EventType.ANNOTATION_DRAFTED.value)
        ).all()
        state = session.scalars(select(Study.state)).one()
    assert len(events) == 1 and events[0].payload["annotation_id"] == outcome.annotation_id
    assert state == "drafted"
    # The cut attempt's SEG and NIfTI are gone; the draft's own are there.
    with store.read() as session:
        draft = session.get_one(Annotation, outcome.annotation_id)
        kept = {Path(draft.seg_path or ""), Path(draft.nifti_path or "")}
    assert set(next(iter(kept)).parent.iterdir()) == kept


@ONCE  # its own PostgreSQL, so it can kill it: the SQLite pass runs it once
@pytest.mark.timeout(300)
def test_postgresql_killed_as_a_save_commits_keeps_nothing_and_the_save_sent_again_once(
    review: Review, own_postgres: PostgresServer
) -> None:
    case, study = review.drafted(97)
    ann = review.client("ann")
    assert ann.post(f"/api/annotations/{case}/claim").status_code == 200
    upload = study.truth.read_bytes()
    cut = {"corrected": False, "killed": False}

    # Seen from the service's own connection (the app runs in this process): the save's
    # transaction has sent its rows, the annotation.corrected event last; COMMIT is next.
    @event.listens_for(review.store.engine, "after_cursor_execute")
    def corrected(conn: Connection, cursor: object, statement: str, *_: object) -> None:
        cut["corrected"] = cut["corrected"] or statement.startswith("INSERT INTO outbox ")

    @event.listens_for(review.store.engine, "commit")
    def kill_before_commit(conn: Connection) -> None:
        if cut["corrected"] and not cut["killed"]:
            cut["killed"] = True
            own_postgres.kill()

    answer = ann.put(f"/api/annotations/{case}/label", content=upload)
    assert cut["killed"], answer.text
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    own_postgres.resume()  # crash recovery: the cut transaction is gone

    with review.store.read() as session:
        annotation = session.get_one(Annotation, case)
        assert (annotation.state, annotation.claimed_by) == ("claimed", "ann")
        assert annotation.correction_path is None
    folder = review.settings.drafts_dir / study.study_uid / "corrections" / f"annotation-{case}"
    left = set(folder.iterdir())
    assert left  # the cut save's SEG and label, referenced by nothing

    again = ann.put(f"/api/annotations/{case}/label", content=upload)
    assert again.status_code == 200, again.text
    assert again.json()["state"] == "corrected"
    with review.store.read() as session:
        kept = Path(session.get_one(Annotation, case).correction_path or "")
        events = session.scalars(
            select(OutboxEvent).where(
                OutboxEvent.event == EventType.ANNOTATION_CORRECTED.value,
                OutboxEvent.resource_id == f"radloop.annotation.{case}",
            )
        ).all()
    assert len(events) == 1
    # Only the kept correction's files (its SEG, label and NIfTI) are in its folder.
    uid = str(again.json()["correction_sop_instance_uid"])
    assert kept.parent == folder and not left & set(folder.iterdir())
    assert {p.name for p in folder.iterdir()} == {f"{uid}.dcm", f"{uid}.nii.gz", kept.name}
