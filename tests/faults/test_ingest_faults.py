"""Faults under the DICOM listener, with a PACS pushing: its spool's disk full, and its
PostgreSQL killed mid-association. An instance is acknowledged with Success only once its file
and index row are durable; refused ones get 0xA700 (Out of Resources), leave no file behind,
and are taken when the PACS sends them again after the fault is gone."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from radloop.db import Instance, OutboxEvent, Store
from tests.conftest_marks import ONCE
from tests.dicom_files import generated_ct
from tests.servers import PostgresServer, RadloopProcess
from tests.test_scp import completed_study

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700

# Real processes (`radloop listen`, PostgreSQL); mounting a file system needs root (CI's user).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a filesystem, runs postgres"),
]


@contextmanager
def pacs(env: dict[str, str]) -> Iterator[Association]:
    """One association, as a PACS opens it to push a series."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", int(env["RADLOOP_DICOM__PORT"]), ae_title="RADLOOP")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def push(assoc: Association, files: list[Path]) -> list[int]:
    """Each file's C-STORE status (-1: no answer)."""
    statuses = []
    for path in files:
        status = assoc.send_c_store(path)
        statuses.append(int(status.Status) if "Status" in status else -1)
    return statuses


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def indexed(store: Store) -> dict[str, str]:
    with store.read() as session:
        return {r.sop_instance_uid: r.path for r in session.scalars(select(Instance))}


@contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` for the duration."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@ONCE  # the spool is a file system; the database is not what fails here
def test_a_full_spool_refuses_with_a700_keeps_no_partial_file_and_recovers_with_space(
    radloop_env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    # 12 slices of 128 KiB; room for a few of them.
    files = generated_ct(tmp_path / "ct", 12, size=256)
    spool = Path(radloop_env["RADLOOP_DATA_DIR"]) / "spool"
    with small_filesystem(spool, "768k"):
        listener = RadloopProcess(radloop_env).start()
        try:
            with pacs(radloop_env) as assoc:
                statuses = push(assoc, files)
            taken = statuses.index(OUT_OF_RESOURCES)
            assert 0 < taken < len(files), statuses
            assert statuses == [SUCCESS] * taken + [OUT_OF_RESOURCES] * (len(files) - taken)

            # What got Success is stored whole and indexed; what was refused left nothing.
            rows = indexed(store)
            assert set(rows) == {sop_uid(path) for path in files[:taken]}
            on_disk = [p for p in spool.rglob("*") if p.is_file()]
            assert sorted(p.relative_to(spool).as_posix() for p in on_disk) == sorted(rows.values())
            for uid, relative in rows.items():
                assert dcmread(spool / relative).SOPInstanceUID == uid

            # Space comes back (the admin grows the volume); the PACS sends the series again.
            subprocess.run(["mount", "-o", "remount,size=16m", str(spool)], check=True)
            with pacs(radloop_env) as assoc:
                assert push(assoc, files) == [SUCCESS] * len(files)
            completed_study(radloop_env, str(dcmread(files[0]).StudyInstanceUID), len(files))
            assert len(indexed(store)) == len(files)
        finally:
            listener.stop()


@ONCE  # its own PostgreSQL, so it can kill it: the SQLite pass runs it once
@pytest.mark.timeout(300)
def test_with_postgresql_killed_instances_are_refused_not_acknowledged_and_taken_once_back(
    radloop_env: dict[str, str], tmp_path: Path
) -> None:
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="radloop-pg-")))  # postgres can reach
    server.start()
    try:
        url = server.create_database("radloop")
        env = {**radloop_env, "RADLOOP_DATABASE_URL": url}
        files = generated_ct(tmp_path / "ct", 9)
        listener = RadloopProcess(env).start()
        store = Store.open(url, migrate=False)
        try:
            with pacs(env) as assoc:
                assert push(assoc, files[:3]) == [SUCCESS] * 3
                server.kill()  # kill -9, postmaster and backends, the listener's connection open
                assert push(assoc, files[3:6]) == [OUT_OF_RESOURCES] * 3
                server.resume()  # crash recovery from the WAL
                # The PACS retries the refused ones, then sends the rest, on the same association.
                assert push(assoc, files[3:]) == [SUCCESS] * 6
            completed_study(env, str(dcmread(files[0]).StudyInstanceUID), len(files))
            # Acknowledged before the kill and after: each once, none lost.
            assert set(indexed(store)) == {sop_uid(path) for path in files}
            with store.read() as session:
                assert session.scalar(select(func.count()).select_from(Instance)) == len(files)
                events = session.scalars(select(OutboxEvent.event)).all()
            assert events == ["radloop.study.completed"]
        finally:
            store.close()
            listener.stop()
    finally:
        server.stop()
