"""A real Orthanc (Debian package) as a peer: pushing to radloop, and being followed."""

from __future__ import annotations

from pathlib import Path

import httpx
from pydicom import dcmread
from sqlalchemy import select

from radloop.app.services import Services
from radloop.app.supervisor import Child
from radloop.db import OutboxEvent, Store
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.dicom_files import generated_ct
from tests.servers import RadloopProcess, radloop_json


def upload(orthanc: Child, files: list[Path]) -> str:
    """POST files to Orthanc's REST API; return the Orthanc id of their study."""
    study_id = ""
    for path in files:
        response = httpx.post(f"{orthanc.spec.url}/instances", content=path.read_bytes())
        response.raise_for_status()
        study_id = response.json()["ParentStudy"]
    return study_id


def completed_events(store: Store) -> list[dict[str, object]]:
    with store.transaction() as session:
        return [
            row.payload
            for row in session.scalars(
                select(OutboxEvent).where(OutboxEvent.event == "radloop.study.completed")
            )
        ]


def test_orthanc_push_to_radloop_ends_as_complete_study(
    orthanc: Child, listener: RadloopProcess, radloop_env: dict[str, str], tmp_path: Path
) -> None:
    files = generated_ct(tmp_path / "ct", 12)
    study_id = upload(orthanc, files)
    response = httpx.post(
        f"{orthanc.spec.url}/modalities/radloop/store", json={"Resources": [study_id]}, timeout=60
    )
    assert response.status_code == 200, response.text
    study_uid = str(dcmread(files[0]).StudyInstanceUID)

    def complete() -> bool:
        studies = radloop_json(radloop_env, "studies", "list")
        return any(
            s["study_uid"] == study_uid and s["state"] == "complete" and s["instances"] == 12
            for s in studies
        )

    wait_until(complete, timeout=30, interval=0.5)


def test_follower_completes_each_stable_study_once_and_resumes_after_restarts(
    orthanc: Child, settings: Settings, store: Store, tmp_path: Path
) -> None:
    first = generated_ct(tmp_path / "a", 6, seed=1)
    study_uid = str(dcmread(first[0]).StudyInstanceUID)
    services = Services(settings, store)
    services.start_follower()
    try:
        upload(orthanc, first[:5])
        wait_until(lambda: len(completed_events(store)) == 1, timeout=30)
        (event,) = completed_events(store)
        assert (event["study_uid"], event["revision"], event["instances"]) == (study_uid, 1, 5)
        assert len(list((settings.spool_dir / study_uid).rglob("*.dcm"))) == 5
    finally:
        services.stop()

    # radloop restarts: the cursor is in the database, the study is not completed again.
    services = Services(settings, store)
    services.start_follower()
    try:
        # Orthanc restarts too; a late instance then reaches it.
        orthanc.stop()
        orthanc.start()
        orthanc.wait_healthy()
        upload(orthanc, first[5:])
        wait_until(lambda: len(completed_events(store)) == 2, timeout=60)
        second = generated_ct(tmp_path / "b", 3, seed=2)
        upload(orthanc, second)
        wait_until(lambda: len(completed_events(store)) == 3, timeout=60)
    finally:
        services.stop()
    events = completed_events(store)
    assert [(e["study_uid"], e["revision"], e["instances"]) for e in events] == [
        (study_uid, 1, 5),
        (study_uid, 2, 6),
        (str(dcmread(second[0]).StudyInstanceUID), 1, 3),
    ]


def test_a_change_the_follower_cannot_handle_is_skipped_with_its_reason_and_it_goes_on(
    orthanc: Child, settings: Settings, store: Store, tmp_path: Path
) -> None:
    broken = generated_ct(tmp_path / "broken", 3, seed=3)
    broken_id = upload(orthanc, broken)

    def stable_change() -> int | None:
        changes = httpx.get(f"{orthanc.spec.url}/changes", params={"limit": 1000}).json()
        for change in changes["Changes"]:
            if change["ChangeType"] == "StableStudy" and change["ID"] == broken_id:
                return int(change["Seq"])
        return None

    seq = wait_until(stable_change, timeout=30)
    # Orthanc's storage loses the study's files (a disk fault; restarted, so its storage cache
    # is empty): it still lists the study but cannot return its instances, so its StableStudy
    # change can never be handled.
    orthanc.stop()
    storage = settings.data_dir / "orthanc" / "storage"
    lost = [path for path in storage.rglob("*") if path.is_file()]
    assert lost
    for path in lost:
        path.unlink()
    orthanc.start()
    orthanc.wait_healthy()
    kept = generated_ct(tmp_path / "kept", 3, seed=4)
    upload(orthanc, kept)
    services = Services(settings, store)
    services.start_follower()
    try:
        wait_until(lambda: len(completed_events(store)) == 1, timeout=60)
    finally:
        services.stop()
    (event,) = completed_events(store)
    assert event["study_uid"] == str(dcmread(kept[0]).StudyInstanceUID)
    reason = (settings.rejected_folder / f"orthanc-change-{seq}.reason").read_text()
    assert f"Orthanc study {broken_id}" in reason and "skipped after 3 attempts" in reason
