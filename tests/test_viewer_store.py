"""What a reader opens is in the Orthanc the viewer reads: a study radloop received itself is
stored there with its draft, once; a late instance follows; a study taken from Orthanc is not
sent back; while Orthanc is down the case waits with its reason and is stored once it is back.
A draft that cannot be made leaves the study queued with its reason; a series without Type 2
patient attributes is drafted."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import highdicom as hd
import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pyorthanc import Orthanc

from agents.annotator import failure_reason
from agents.review.worklist import Conflict
from agents.viewer_store import ViewerStore, ViewerStoreUnavailable
from dicom_listener import Ingestor, InstanceHeader, OrthancFollower, StudyAssembler
from model_registry.inference import InferenceUnavailable, TritonBackend
from model_registry.repository import TritonRepository
from radloop.app.phantoms import write_study
from radloop.app.supervisor import Child
from radloop.db import Store
from radloop.domain import AnnotationState, IngestSource
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.dicom_files import with_uid
from tests.drafted import annotator, received_phantom, worklist
from tests.models import export_version
from tests.servers import free_port, radloop_json

# Type 2 attributes of the Patient and General Study modules that de-identified exports omit.
TYPE2_REMOVED = (
    "PatientSex",
    "PatientBirthDate",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


@pytest.fixture
def spec() -> ModelSpec:
    return load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")


def sop_uids_in_orthanc(url: str, study_uid: str) -> dict[str, str]:
    """SOP Instance UID → modality of every instance of the study that Orthanc holds."""
    found = httpx.post(
        f"{url}/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
    ).json()
    series = {
        item["ParentSeries"]: httpx.get(f"{url}/series/{item['ParentSeries']}").json()
        for item in found
    }
    return {
        item["MainDicomTags"]["SOPInstanceUID"]: series[item["ParentSeries"]]["MainDicomTags"][
            "Modality"
        ]
        for item in found
    }


def test_a_received_study_reaches_orthanc_with_its_draft_once_and_a_late_instance_follows(
    store: Store,
    settings: Settings,
    orthanc: Child,
    spec: ModelSpec,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=31)
    client = Orthanc(orthanc.spec.url)
    worker = annotator(store, settings, client)
    assert sop_uids_in_orthanc(orthanc.spec.url, study.study_uid) == {}

    with caplog.at_level(logging.INFO, logger="agents.viewer_store"):
        first = worker.annotate(study.study_uid, 1, spec)
    assert first.state == AnnotationState.DRAFTED
    held = sop_uids_in_orthanc(orthanc.spec.url, study.study_uid)
    assert sorted(held.values()) == ["CT"] * study.slices + ["SEG"]
    assert f"{study.slices} instances stored" in caplog.text
    (row,) = worklist(store, settings, spec).items()
    assert row["viewable"] and row["viewer_error"] is None

    # Drafting the same revision again, or publishing it again, sends nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="agents.viewer_store"):
        assert worker.annotate(study.study_uid, 1, spec).annotation_id == first.annotation_id
    assert "instances stored" not in caplog.text

    # A late instance (a new series of the study) reopens it as revision 2: only it is sent.
    first_slice = sorted(study.dicom_dir.glob("*.dcm"))[0]
    late = with_uid(first_slice, "SeriesInstanceUID", generate_uid(), tmp_path / "late.dcm")
    ds = dcmread(late)
    Ingestor(store, settings.spool_dir).ingest(
        InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID)),
        late.read_bytes(),
        IngestSource.DIMSE,
    )
    assert StudyAssembler(store, 1).complete(study.study_uid) is not None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="agents.viewer_store"):
        second = worker.annotate(study.study_uid, 2, spec)
    assert second.state == AnnotationState.DRAFTED
    assert "1 instances stored" in caplog.text
    held = sop_uids_in_orthanc(orthanc.spec.url, study.study_uid)
    assert str(ds.SOPInstanceUID) in held
    assert sorted(held.values()) == ["CT"] * (study.slices + 1) + ["SEG", "SEG"]


def test_a_study_taken_from_orthanc_is_not_sent_back(
    store: Store,
    settings: Settings,
    orthanc: Child,
    spec: ModelSpec,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    export_version(settings, spec)
    study = write_study(tmp_path / "phantoms", 0, seed=32)
    url = orthanc.spec.url
    for path in sorted(study.dicom_dir.glob("*.dcm")):  # the PACS stores it in Orthanc
        httpx.post(f"{url}/instances", content=path.read_bytes()).raise_for_status()
    client = Orthanc(url)
    follower = OrthancFollower(
        store, Ingestor(store, settings.spool_dir), StudyAssembler(store, 1), client
    )
    wait_until(lambda: follower.poll_once() and radloop_study_complete(store, study.study_uid), 30)
    # Someone removes one slice from Orthanc before radloop drafts the study.
    removed = sorted(study.dicom_dir.glob("*.dcm"))[0]
    (hit,) = httpx.post(f"{url}/tools/lookup", content=str(dcmread(removed).SOPInstanceUID)).json()
    httpx.delete(f"{url}/instances/{hit['ID']}").raise_for_status()

    with caplog.at_level(logging.INFO, logger="agents.viewer_store"):
        outcome = annotator(store, settings, client).annotate(study.study_uid, 1, spec)
    assert outcome.state == AnnotationState.DRAFTED
    assert "instances stored" not in caplog.text
    assert "1 instances taken from Orthanc are no longer there; not sent back" in caplog.text
    held = sop_uids_in_orthanc(url, study.study_uid)
    assert sorted(held.values()) == ["CT"] * (study.slices - 1) + ["SEG"]


def radloop_study_complete(store: Store, study_uid: str) -> bool:
    from sqlalchemy import select

    from radloop.db import Study

    with store.read() as session:
        state = session.scalar(select(Study.state).where(Study.study_uid == study_uid))
    return state == "complete"


@ONCE  # an Orthanc outage; the reconciler's SQL runs on PostgreSQL in the tests above
def test_while_orthanc_is_down_the_case_waits_with_its_reason_and_is_stored_once_it_is_back(
    store: Store,
    settings: Settings,
    orthanc: Child,
    spec: ModelSpec,
    tmp_path: Path,
    radloop_env: dict[str, str],
) -> None:
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=33)
    client = Orthanc(orthanc.spec.url, timeout=5)
    orthanc.stop()

    with pytest.raises(ViewerStoreUnavailable):
        annotator(store, settings, client).annotate(study.study_uid, 1, spec)
    (case,) = radloop_json(radloop_env, "queue", "list")
    assert case["state"] == "drafted" and not case["viewable"]
    assert "images not yet in the viewer's store" in case["viewer_error"]
    assert "ConnectError" in case["viewer_error"]
    cases = worklist(store, settings, spec)
    with pytest.raises(Conflict, match="cannot be opened yet: images not yet in the viewer"):
        cases.claim(case["annotation_id"], "ann")

    orthanc.start()
    orthanc.wait_healthy()
    viewer = ViewerStore(store, settings.spool_dir, client)
    assert viewer.publish_pending(timedelta(0)) == 1
    (case,) = radloop_json(radloop_env, "queue", "list")
    assert case["viewable"] and case["viewer_error"] is None
    assert cases.claim(case["annotation_id"], "ann")["state"] == "claimed"
    held = sop_uids_in_orthanc(orthanc.spec.url, study.study_uid)
    assert sorted(held.values()) == ["CT"] * study.slices + ["SEG"]
    assert viewer.publish_pending(timedelta(0)) == 0


def test_a_draft_that_cannot_be_made_queues_the_study_for_readers_with_the_reason(
    store: Store,
    settings: Settings,
    orthanc: Child,
    spec: ModelSpec,
    tmp_path: Path,
    radloop_env: dict[str, str],
) -> None:
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=34)
    client = Orthanc(orthanc.spec.url)
    # The annotation flow's own objects; no Triton listens where this one points.
    worker = annotator(store, settings, client)
    worker.backend = TritonBackend(f"http://127.0.0.1:{free_port()}", 5)
    with pytest.raises(InferenceUnavailable) as failed:
        worker.annotate(study.study_uid, 1, spec)
    reason = failure_reason(failed.value)
    assert reason.startswith("draft failed (infer): InferenceUnavailable: Triton inference")

    outcome = worker.queue_failed(study.study_uid, 1, spec, reason)
    assert outcome.state == AnnotationState.QUEUED
    again = worker.queue_failed(study.study_uid, 1, spec, reason)
    assert again.annotation_id == outcome.annotation_id
    (case,) = radloop_json(radloop_env, "queue", "list")
    assert case["state"] == "queued" and case["reason"] == reason
    assert case["series_uid"] == study.series_uid and case["seg_sop_instance_uid"] is None
    assert case["viewable"]  # readers label it from scratch on its images
    held = sop_uids_in_orthanc(orthanc.spec.url, study.study_uid)
    assert sorted(held.values()) == ["CT"] * study.slices


@ONCE  # DICOM attributes of the draft: nothing database-specific
def test_a_series_without_type2_patient_attributes_gets_a_draft_that_carries_them_empty(
    store: Store, settings: Settings, spec: ModelSpec, tmp_path: Path
) -> None:
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=35, without=TYPE2_REMOVED)
    assert "PatientSex" not in dcmread(sorted(study.dicom_dir.glob("*.dcm"))[0])

    outcome = annotator(store, settings, None).annotate(study.study_uid, 1, spec)

    assert outcome.state == AnnotationState.DRAFTED, outcome.reason
    from sqlalchemy import select

    from radloop.db import Annotation

    with store.read() as session:
        seg_path = session.scalar(select(Annotation.seg_path))
    assert seg_path is not None
    seg = hd.seg.segread(seg_path)
    for keyword in TYPE2_REMOVED:
        assert keyword in seg and not seg.get(keyword), keyword
    assert TritonRepository(settings.model_repository).champion(spec.name) == 1
