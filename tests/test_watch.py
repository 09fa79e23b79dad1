"""The watch folder: slow writers, moved-in files, and what is not DICOM."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from radloop.app.services import Services
from radloop.db import Instance, OutboxEvent, Store
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.dicom_files import generated_ct, truncated


@pytest.fixture
def watching(settings: Settings, store: Store) -> Iterator[Services]:
    services = Services(settings, store)
    services.start_watch()
    wait_until(settings.watch_folder.is_dir, timeout=30)
    yield services
    services.stop()


def completed(store: Store) -> list[tuple[dict[str, object]]]:
    with store.transaction() as session:
        return [(payload,) for payload in session.scalars(select(OutboxEvent.payload))]


def stored_uids(store: Store) -> set[str]:
    with store.transaction() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def test_slowly_written_file_is_taken_once_complete(
    watching: Services, settings: Settings, store: Store, tmp_path: Path
) -> None:
    (source,) = generated_ct(tmp_path / "ct", 1, size=128)
    data = source.read_bytes()
    target = settings.watch_folder / "slow.dcm"
    with open(target, "wb") as handle:
        for start in range(0, len(data), len(data) // 8):
            handle.write(data[start : start + len(data) // 8])
            handle.flush()
            time.sleep(0.2)  # a writer slower than the settle time's half
    uid = str(dcmread(source).SOPInstanceUID)
    wait_until(lambda: uid in stored_uids(store), timeout=20)
    wait_until(lambda: not target.exists(), timeout=10)
    assert not list(settings.rejected_folder.rglob("*"))


def test_files_moved_in_enter_the_same_path_and_complete_the_study(
    watching: Services, settings: Settings, store: Store, tmp_path: Path
) -> None:
    files = generated_ct(tmp_path / "ct", 4)
    staging = settings.watch_folder.parent / "staging"
    shutil.copytree(files[0].parent, staging)
    os.rename(staging, settings.watch_folder / "export-1")  # one atomic move of a folder
    expected = {str(dcmread(p).SOPInstanceUID) for p in files}
    wait_until(lambda: stored_uids(store) == expected, timeout=20)
    services = Services(settings, store)
    services.start_listener()  # its assembler completes the study after the quiet period
    try:
        wait_until(lambda: completed(store), timeout=20)
    finally:
        services.stop()
    ((payload,),) = completed(store)
    assert payload["instances"] == 4 and payload["study_uid"] == str(
        dcmread(files[0]).StudyInstanceUID
    )


def test_files_that_are_not_dicom_are_rejected_with_a_reason(
    watching: Services, settings: Settings, store: Store, tmp_path: Path
) -> None:
    (good,) = generated_ct(tmp_path / "ct", 1)
    (settings.watch_folder / "notes.txt").write_text("not an image\n")
    truncated(good, settings.watch_folder / "cut.dcm", keep=0.5)
    shutil.copy(good, settings.watch_folder / "good.dcm")
    uid = str(dcmread(good).SOPInstanceUID)
    wait_until(lambda: uid in stored_uids(store), timeout=20)
    rejected = settings.rejected_folder
    wait_until(lambda: (rejected / "cut.dcm.reason").exists(), timeout=20)
    wait_until(lambda: (rejected / "notes.txt.reason").exists(), timeout=20)
    assert "not a DICOM file" in (rejected / "notes.txt.reason").read_text()
    assert "truncated" in (rejected / "cut.dcm.reason").read_text()
    assert (rejected / "notes.txt").read_text() == "not an image\n"
    assert stored_uids(store) == {uid}
    assert not list(settings.watch_folder.iterdir())


def test_files_present_before_start_are_taken(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    files = generated_ct(settings.watch_folder / "old", 2)
    services = Services(settings, store)
    services.start_watch()
    try:
        expected = {str(dcmread(p).SOPInstanceUID) for p in files}
        wait_until(lambda: stored_uids(store) == expected, timeout=20)
    finally:
        services.stop()
