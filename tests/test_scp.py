"""The C-STORE SCP with real senders: dcmtk storescu and pynetdicom, against `radloop listen`."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import select

from radloop.db import Instance, OutboxEvent, Store
from radloop.wait import wait_until
from tests.dicom_files import (
    REAL_FILES_FOR_STORESCU,
    REAL_FILES_J2K,
    UNSUPPORTED_SOP_CLASS_FILE,
    generated_ct,
    real_file,
    truncated,
    with_uid,
)
from tests.servers import RadloopProcess, radloop_json, self_signed_certificate

STORESCU = "/usr/bin/storescu"


def storescu(
    env: dict[str, str], files: list[Path], *args: str
) -> subprocess.CompletedProcess[str]:
    port = env["RADLOOP_DICOM__PORT"]
    return subprocess.run(
        [STORESCU, "-aec", "RADLOOP", *args, "127.0.0.1", port, *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def completed_study(env: dict[str, str], study_uid: str, instances: int) -> dict[str, object]:
    def done() -> dict[str, object] | None:
        for study in radloop_json(env, "studies", "list"):
            if study["study_uid"] == study_uid and study["state"] == "complete":
                assert study["instances"] == instances
                return dict(study)
        return None

    found: dict[str, object] = wait_until(done, timeout=30, interval=0.5)
    return found


def test_storescu_push_of_ct_series_ends_as_complete_study(
    listener: RadloopProcess, radloop_env: dict[str, str], tmp_path: Path
) -> None:
    files = generated_ct(tmp_path / "ct", 20, size=512)
    result = storescu(radloop_env, files)
    assert result.returncode == 0, result.stderr
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    study = completed_study(radloop_env, study_uid, 20)
    assert study["revision"] == 1 and study["modalities"] == ["CT"]
    shown = radloop_json(radloop_env, "studies", "show", study_uid)
    assert shown["series"][0]["instances"] == 20
    assert [e["event"] for e in shown["events"]] == ["radloop.study.completed"]


def test_real_files_are_stored_exactly_as_received(
    listener: RadloopProcess, radloop_env: dict[str, str], store: Store
) -> None:
    files = []
    for name, propose in REAL_FILES_FOR_STORESCU.items():
        # Propose the file's own (compressed) syntax first, as a PACS sending it does.
        files.append(real_file(name))
        result = storescu(radloop_env, files[-1:], "-R", propose)
        assert result.returncode == 0, result.stderr
    j2k = [real_file(name) for name in REAL_FILES_J2K]
    ae = AE(ae_title="STORESCU")
    for path in j2k:
        sent = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", int(radloop_env["RADLOOP_DICOM__PORT"]), ae_title="RADLOOP")
    assert [assoc.send_c_store(path).Status for path in j2k] == [0, 0]
    assoc.release()
    files += j2k
    spool = Path(radloop_env["RADLOOP_DATA_DIR"]) / "spool"
    with store.transaction() as session:
        stored = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    for path in files:
        sent = dcmread(path)
        row = stored[str(sent.SOPInstanceUID)]
        kept = dcmread(spool / row.path)
        assert row.transfer_syntax_uid == str(sent.file_meta.TransferSyntaxUID), path.name
        assert str(kept.file_meta.TransferSyntaxUID) == str(sent.file_meta.TransferSyntaxUID)
        assert kept.PixelData == sent.PixelData, path.name  # compressed bytes untouched


def _file_with_garbage_dataset(target: Path) -> Path:
    """Valid Part 10 meta header announcing a CT instance, followed by bytes that are not one."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    buffer.write(b"this is a text file, not a DICOM dataset\n" * 4)
    target.write_bytes(buffer.getvalue())
    return target


def test_bad_instances_are_refused_while_the_rest_of_the_association_is_stored(
    listener: RadloopProcess,
    radloop_env: dict[str, str],
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Send each file's bytes as they are (UIDs from the meta header), broken ones included.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    good = generated_ct(tmp_path / "ct", 3)
    bad = {
        "missing study UID": with_uid(good[0], "StudyInstanceUID", None, tmp_path / "b1.dcm"),
        "path traversal study UID": with_uid(
            good[0], "StudyInstanceUID", "../../../../tmp/evil", tmp_path / "b2.dcm"
        ),
        "slash in series UID": with_uid(good[0], "SeriesInstanceUID", "1.2/3", tmp_path / "b3.dcm"),
        "truncated": truncated(
            with_uid(good[0], "SeriesNumber", "2", tmp_path / "t.dcm"), tmp_path / "b4.dcm"
        ),
        "not a dataset": _file_with_garbage_dataset(tmp_path / "b5.dcm"),
    }
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", int(radloop_env["RADLOOP_DICOM__PORT"]), ae_title="RADLOOP")
    assert assoc.is_established
    statuses = {"good 1": assoc.send_c_store(good[0]).Status}
    for name, path in bad.items():
        statuses[name] = assoc.send_c_store(path).Status
        assert assoc.is_established, f"association dropped after {name}"
    statuses["good 2"] = assoc.send_c_store(good[1]).Status
    statuses["good 3"] = assoc.send_c_store(good[2]).Status
    assoc.release()

    assert statuses == {
        "good 1": 0x0000,
        "missing study UID": 0xA900,
        "path traversal study UID": 0xA900,
        "slash in series UID": 0xA900,
        "truncated": 0xC210,
        "not a dataset": 0xC210,
        "good 2": 0x0000,
        "good 3": 0x0000,
    }
    with store.transaction() as session:
        kept = set(session.scalars(select(Instance.sop_instance_uid)))
    assert kept == {str(dcmread(p).SOPInstanceUID) for p in good}
    assert not Path("/tmp/evil").exists()
    log = listener.output()
    assert "StudyInstanceUID is missing" in log and "pixel data truncated" in log
    assert "PHANTOM" not in log  # no patient name in the log


def test_unknown_calling_ae_is_rejected(radloop_env: dict[str, str], tmp_path: Path) -> None:
    env = {**radloop_env, "RADLOOP_DICOM__ALLOWED_CALLERS": "PACS@127.0.0.1"}
    process = RadloopProcess(env).start(calling="PACS")
    try:
        files = generated_ct(tmp_path / "ct", 2)
        refused = storescu(env, files, "-aet", "STORESCU")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
        wrong_called = subprocess.run(
            [
                STORESCU,
                "-aet",
                "PACS",
                "-aec",
                "NOT_RADLOOP",
                "127.0.0.1",
                env["RADLOOP_DICOM__PORT"],
                str(files[0]),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert wrong_called.returncode != 0
        accepted = storescu(env, files, "-aet", "PACS")
        assert accepted.returncode == 0, accepted.stderr
        assert "rejected association from AE 'STORESCU'" in process.output()
    finally:
        process.stop()


def test_unsupported_sop_class_is_refused_and_the_rest_stored(
    listener: RadloopProcess, radloop_env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    files = generated_ct(tmp_path / "ct", 2)
    result = storescu(
        radloop_env, [files[0], real_file(UNSUPPORTED_SOP_CLASS_FILE), files[1]], "-R", "-nh"
    )
    # The RT Plan's presentation context is refused at negotiation; storescu says so.
    assert "No presentation context for: (RP) 1.2.840.10008.5.1.4.1.1.481.5" in result.stderr
    with store.transaction() as session:
        kept = set(session.scalars(select(Instance.sop_instance_uid)))
    assert kept == {str(dcmread(p).SOPInstanceUID) for p in files}


def test_every_acknowledged_instance_survives_kill_9_and_the_study_completes(
    listener: RadloopProcess, radloop_env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    files = generated_ct(tmp_path / "ct", 150, size=256)
    acknowledged: list[str] = []

    def push() -> None:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(
            "127.0.0.1", int(radloop_env["RADLOOP_DICOM__PORT"]), ae_title="RADLOOP"
        )
        for path in files:
            if not assoc.is_established:
                return
            status = assoc.send_c_store(path)
            if status and status.Status == 0:
                acknowledged.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assoc.release()

    sender = threading.Thread(target=push)
    sender.start()
    wait_until(lambda: len(acknowledged) >= 40, timeout=60, interval=0.01)
    listener.kill()
    sender.join(60)
    assert 40 <= len(acknowledged) < len(files)

    spool = Path(radloop_env["RADLOOP_DATA_DIR"]) / "spool"
    with store.transaction() as session:
        rows = {r.sop_instance_uid: r.path for r in session.scalars(select(Instance))}
    for uid in acknowledged:
        assert uid in rows, "acknowledged instance missing from the database"
        assert dcmread(spool / rows[uid]).SOPInstanceUID == uid

    # The PACS retries the whole series after the restart; nothing is duplicated.
    listener.start()
    result = storescu(radloop_env, files, "-aet", "PACS")
    assert result.returncode == 0, result.stderr
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    completed_study(radloop_env, study_uid, len(files))


def test_completion_timer_survives_a_restart(
    radloop_env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    env = {**radloop_env, "RADLOOP_DICOM__QUIET_SECONDS": "4"}
    process = RadloopProcess(env).start()
    files = generated_ct(tmp_path / "ct", 5)
    assert storescu(env, files).returncode == 0
    process.kill()
    time.sleep(5)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    (study,) = radloop_json(env, "studies", "list")
    assert study["state"] == "receiving"  # nobody was there to complete it
    process.start()
    try:
        completed_study(env, study_uid, 5)
    finally:
        process.stop()
    with store.transaction() as session:
        events = session.scalars(select(OutboxEvent.event)).all()
    assert events == ["radloop.study.completed"]


def test_tls_listener_takes_studies_from_a_trusted_caller_only(
    radloop_env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    server_key, server_cert = self_signed_certificate(tmp_path, "radloop")
    client_key, client_cert = self_signed_certificate(tmp_path, "pacs")
    env = {
        **radloop_env,
        "RADLOOP_DICOM__TLS__CERT_FILE": str(server_cert),
        "RADLOOP_DICOM__TLS__KEY_FILE": str(server_key),
        "RADLOOP_DICOM__TLS__CA_FILE": str(client_cert),  # the PACS's certificate is trusted
    }
    process = RadloopProcess(env).start(calling=None)
    try:
        files = generated_ct(tmp_path / "ct", 3)
        trusted = storescu(
            env, files, "+tls", str(client_key), str(client_cert), "+cf", str(server_cert)
        )
        assert trusted.returncode == 0, trusted.stderr
        plain = storescu(env, files[:1])
        assert plain.returncode != 0
        anonymous = storescu(env, files[:1], "+tla", "+cf", str(server_cert))
        assert anonymous.returncode != 0
        # Orthanc and Prefect are not running here, so status exits 1; the SCP must be healthy.
        status = radloop_json(env, "status", exit_codes=(1,))
        (dicom,) = [s for s in status["services"] if s["name"] == "dicom"]
        assert dicom["healthy"] and dicom["url"].startswith("dicom+tls://")
    finally:
        process.stop()
    with store.transaction() as session:
        kept = set(session.scalars(select(Instance.sop_instance_uid)))
    assert kept == {str(dcmread(p).SOPInstanceUID) for p in files}
