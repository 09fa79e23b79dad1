"""Ingest and study assembly against the configured backend (SQLite or PostgreSQL)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from pydicom import dcmread
from sqlalchemy import func, inspect, select

from dicom_listener import Ingestor, IngestOutcome, InstanceHeader, StudyAssembler
from radloop.db import Instance, OutboxEvent, Store, Study, utcnow
from radloop.db.engine import MIGRATIONS, schema_head, schema_revision
from radloop.domain import IngestSource, StudyState
from radloop.settings import Settings
from tests.dicom_files import generated_ct
from tests.servers import RADLOOP, RadloopProcess, radloop_json


def _ingest_files(ingestor: Ingestor, paths: list[Path]) -> list[IngestOutcome]:
    outcomes = []
    for path in paths:
        ds = dcmread(path)
        header = InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
        outcomes.append(ingestor.ingest(header, path.read_bytes(), IngestSource.DIMSE))
    return outcomes


def test_repeated_sop_instance_is_stored_once(
    store: Store, settings: Settings, tmp_path: Path
) -> None:
    ingestor = Ingestor(store, settings.spool_dir)
    paths = generated_ct(tmp_path / "ct", 3)
    assert _ingest_files(ingestor, paths) == [IngestOutcome.STORED] * 3
    assert _ingest_files(ingestor, paths) == [IngestOutcome.DUPLICATE] * 3
    with store.transaction() as session:
        assert len(session.scalars(select(Instance)).all()) == 3
    assert len(list(settings.spool_dir.rglob("*.dcm"))) == 3


def _header_and_bytes(path: Path) -> tuple[InstanceHeader, bytes]:
    ds = dcmread(path)
    return InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID)), path.read_bytes()


def _at_once(ingestor: Ingestor, paths: list[Path]) -> list[IngestOutcome | BaseException]:
    """Ingest `paths` from as many threads, released together (as concurrent associations)."""
    inputs = [_header_and_bytes(path) for path in paths]
    start = threading.Barrier(len(inputs))

    def one(header: InstanceHeader, data: bytes) -> IngestOutcome | BaseException:
        start.wait()
        try:
            return ingestor.ingest(header, data, IngestSource.DIMSE)
        except Exception as error:
            return error

    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(lambda pair: one(*pair), inputs))


def test_concurrent_senders_store_each_instance_once(
    store: Store, settings: Settings, tmp_path: Path
) -> None:
    """Four senders push the same instance while four push others: whichever groups the indexer
    makes, each instance ends as one row and one file, and the repeats are duplicates."""
    paths = generated_ct(tmp_path / "ct", 5)
    ingestor = Ingestor(store, settings.spool_dir)
    for _ in range(3):
        outcomes = _at_once(ingestor, [paths[0]] * 4 + paths[1:])
        assert not [o for o in outcomes if isinstance(o, BaseException)]
    with store.read() as session:
        rows = session.scalars(select(Instance)).all()
    assert sorted(row.sop_instance_uid for row in rows) == sorted(
        str(dcmread(path).SOPInstanceUID) for path in paths
    )
    assert len(list(settings.spool_dir.rglob("*.dcm"))) == 5
    assert not [p for p in settings.spool_dir.rglob("*") if ".part-" in p.name]


def test_an_instance_whose_file_cannot_be_written_is_refused_and_its_group_indexed(
    store: Store, settings: Settings, tmp_path: Path
) -> None:
    """One study's folder cannot be created (a file is in its way): its instance raises, is not
    indexed, and leaves no file; the instances received at the same moment are stored."""
    good = generated_ct(tmp_path / "good", 4)
    (blocked,) = generated_ct(tmp_path / "blocked", 1)
    blocked_study = str(dcmread(blocked).StudyInstanceUID)
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    (settings.spool_dir / blocked_study).write_text("not a folder")
    ingestor = Ingestor(store, settings.spool_dir)
    outcomes = _at_once(ingestor, [*good, blocked])
    assert outcomes[:4] == [IngestOutcome.STORED] * 4
    assert isinstance(outcomes[4], OSError)
    with store.read() as session:
        studies = session.scalars(select(Study.study_uid)).all()
        assert session.scalar(select(func.count()).select_from(Instance)) == 4
    assert blocked_study not in studies
    # The admin clears the way; the PACS sends it again.
    (settings.spool_dir / blocked_study).unlink()
    assert _ingest_files(ingestor, [blocked]) == [IngestOutcome.STORED]


def test_study_completes_once_after_quiet_period(
    store: Store, settings: Settings, tmp_path: Path
) -> None:
    ingestor = Ingestor(store, settings.spool_dir)
    _ingest_files(ingestor, generated_ct(tmp_path / "ct", 2))
    assembler = StudyAssembler(store, quiet_seconds=30)
    assert assembler.complete_due() == []  # not quiet yet
    later = utcnow() + timedelta(seconds=31)
    (event,) = assembler.complete_due(now=later)
    assert event.instances == 2 and event.revision == 1
    # A fresh assembler (as after a restart) finds nothing more to complete.
    assert StudyAssembler(store, quiet_seconds=30).complete_due(now=later) == []
    with store.transaction() as session:
        rows = session.scalars(select(OutboxEvent)).all()
        study = session.scalars(select(Study)).one()
    assert study.state == StudyState.COMPLETE
    assert [row.event for row in rows] == ["radloop.study.completed"]
    assert rows[0].idempotency_key == f"study:{study.study_uid}:rev:1"


def test_late_instance_reopens_study_as_new_revision(
    store: Store, settings: Settings, tmp_path: Path
) -> None:
    ingestor = Ingestor(store, settings.spool_dir)
    paths = generated_ct(tmp_path / "ct", 3)
    _ingest_files(ingestor, paths[:2])
    assembler = StudyAssembler(store, quiet_seconds=1)
    assert len(assembler.complete_due(now=utcnow() + timedelta(seconds=2))) == 1
    # The same instance again changes nothing; a new one reopens the study.
    _ingest_files(ingestor, paths[:1])
    with store.transaction() as session:
        assert session.scalars(select(Study)).one().state == StudyState.COMPLETE
    _ingest_files(ingestor, paths[2:])
    with store.transaction() as session:
        study = session.scalars(select(Study)).one()
        assert (study.state, study.revision) == (StudyState.RECEIVING, 2)
    (event,) = assembler.complete_due(now=utcnow() + timedelta(seconds=2))
    assert (event.revision, event.instances) == (2, 3)
    with store.transaction() as session:
        keys = [row.idempotency_key for row in session.scalars(select(OutboxEvent))]
    assert keys == [f"study:{event.study_uid}:rev:1", f"study:{event.study_uid}:rev:2"]


def test_events_carry_no_patient_data(store: Store, settings: Settings, tmp_path: Path) -> None:
    ingestor = Ingestor(store, settings.spool_dir)
    paths = generated_ct(tmp_path / "ct", 1)
    _ingest_files(ingestor, paths)
    StudyAssembler(store, quiet_seconds=1).complete_due(now=utcnow() + timedelta(seconds=2))
    ds = dcmread(paths[0])
    with store.transaction() as session:
        row = session.scalars(select(OutboxEvent)).one()
        text = json.dumps(row.payload) + row.resource_id + row.idempotency_key
    for value in (str(ds.PatientName), str(ds.PatientID), "PHANTOM"):
        assert value not in text


@pytest.mark.slow  # starts `radloop listen`
def test_an_outdated_schema_is_refused_by_commands_and_upgraded_by_a_service_start(
    store: Store, settings: Settings, radloop_env: dict[str, str]
) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "-1")
    previous = schema_revision(store.engine)
    assert previous is not None and previous != schema_head()

    listing = subprocess.run(
        [RADLOOP, "studies", "list", "--json"], env=radloop_env, capture_output=True, text=True
    )
    assert listing.returncode == 2
    assert f"the database schema is at {previous}" in listing.stderr
    assert schema_revision(store.engine) == previous  # a command never migrates

    listener = RadloopProcess(radloop_env).start()  # a service: upgrades once, at start
    listener.stop()
    assert schema_revision(store.engine) == schema_head()
    assert radloop_json(radloop_env, "studies", "list") == []


def test_services_starting_together_on_a_new_database_migrate_it_once(
    database_url: str,
) -> None:
    # As Compose, Kubernetes or a cluster's hosts start them: four services open a database
    # nobody used yet in the same instant, each asking to migrate it.
    at = time.time() + 4  # past every interpreter's imports
    opens = (
        f"import time; from radloop.db import Store; time.sleep(max(0, {at} - time.time())); "
        f"Store.open({database_url!r}, migrate=True).close()"
    )
    services = [
        subprocess.Popen([sys.executable, "-c", opens], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [service.communicate(timeout=120)[1] for service in services]
    assert [service.returncode for service in services] == [0] * 4, errors
    store = Store.open(database_url)
    try:
        assert schema_revision(store.engine) == schema_head()
        assert radloop_tables(store) >= {"studies", "annotation_jobs", "workers"}
    finally:
        store.close()


def radloop_tables(store: Store) -> set[str]:
    return set(inspect(store.engine).get_table_names())
