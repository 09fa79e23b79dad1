"""Annotating a completed study: one draft per revision and model, its SEG in a real Orthanc,
a reason when no series fits, and the review queue without a draft at cold start."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pyorthanc import Orthanc
from sqlalchemy import func, select

from agents.segmentation import label_map_from_seg
from agents.volume import load_series
from dicom_listener import Ingestor, OrthancFollower, StudyAssembler
from model_registry.inference import InProcessBackend
from radloop.app.supervisor import Child
from radloop.db import Annotation, OutboxEvent, Store, Study
from radloop.domain import AnnotationState
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.drafted import annotator, received_phantom
from tests.models import export_version
from tests.servers import radloop_json


@pytest.fixture
def spec() -> ModelSpec:
    return load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")


def test_completed_study_gets_one_draft_whose_seg_is_in_orthanc_and_reads_back(
    store: Store,
    settings: Settings,
    orthanc: Child,
    spec: ModelSpec,
    tmp_path: Path,
    radloop_env: dict[str, str],
) -> None:
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=21)
    client = Orthanc(orthanc.spec.url)
    worker = annotator(store, settings, client)

    first = worker.annotate(study.study_uid, 1, spec)
    again = worker.annotate(study.study_uid, 1, spec)

    assert first.state == AnnotationState.DRAFTED and again.annotation_id == first.annotation_id
    with store.read() as session:
        (row,) = session.scalars(select(Annotation)).all()
        events = session.scalars(
            select(OutboxEvent.event).where(OutboxEvent.event == "radloop.annotation.drafted")
        ).all()
        state = session.scalar(select(Study.state))
    assert len(events) == 1 and state == "drafted"
    assert row.model_version == "1" and row.scores is not None
    assert 0 <= row.scores["entropy"] <= 1 and row.uncertainty == row.scores["entropy"]
    # The study's embedding (the UNet bottleneck, mean- and max-pooled): for diversity.
    embedding = np.frombuffer(row.embedding or b"", dtype="<f4")
    assert embedding.shape == (256,) and np.linalg.norm(embedding) == pytest.approx(1, abs=1e-5)
    assert row.series_uid == study.series_uid
    (queued,) = radloop_json(radloop_env, "queue", "list")
    assert queued["annotation_id"] == row.id and queued["state"] == "drafted"
    assert queued["rank"] == 1 and queued["scores"] == row.scores
    assert queued["selection"]["strategy"] == "entropy"
    assert queued["selection"]["value"] == pytest.approx(row.scores["entropy"])
    assert (queued["model"], queued["model_version"]) == ("phantom-abdomen", "1")
    assert queued["seg_sop_instance_uid"] == row.seg_sop_instance_uid
    found = httpx.post(f"{orthanc.spec.url}/tools/lookup", content=row.seg_sop_instance_uid)
    assert [item["Type"] for item in found.json()] == ["Instance"]

    series = load_series(sorted(study.dicom_dir.glob("*.dcm")))
    produced = InProcessBackend(settings.model_repository).infer(
        spec.name, series.array, series.spacing
    )
    assert row.seg_path is not None
    assert np.array_equal(label_map_from_seg(dcmread(row.seg_path), series), produced.labels)

    # The follower sees the SEG appear in Orthanc and must not take it for a new instance.
    follower = OrthancFollower(
        store, Ingestor(store, settings.spool_dir), StudyAssembler(store, 1), client
    )

    def stable_study_handled() -> bool:
        follower.poll_once()
        changes = httpx.get(f"{orthanc.spec.url}/changes", params={"limit": 100}).json()
        stable = [c["Seq"] for c in changes["Changes"] if c["ChangeType"] == "StableStudy"]
        return bool(stable) and follower.cursor() >= stable[0]

    wait_until(stable_study_handled, timeout=30, interval=0.3)
    with store.read() as session:
        assert session.scalar(select(Study.revision)) == 1
        assert session.scalar(select(func.count(Annotation.id))) == 1


def test_series_that_the_spec_does_not_accept_gets_no_draft_and_a_reason(
    store: Store, settings: Settings, spec: ModelSpec, tmp_path: Path
) -> None:
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=22)
    mr_only = spec.model_copy(update={"input": spec.input.model_copy(update={"modality": "MR"})})
    thick = spec.model_copy(update={"input": spec.input.model_copy(update={"min_slices": 500})})

    refused = annotator(store, settings, None).annotate(study.study_uid, 1, mr_only)
    assert refused.state == AnnotationState.NOT_APPLICABLE
    assert refused.reason is not None and "modality CT, needs MR" in refused.reason

    with store.transaction() as session:
        session.query(Annotation).delete()
    too_few = annotator(store, settings, None).annotate(study.study_uid, 1, thick)
    assert too_few.reason is not None and "too few slices" in too_few.reason


def test_cold_start_puts_the_study_in_the_queue_without_a_draft(
    store: Store, settings: Settings, spec: ModelSpec, tmp_path: Path
) -> None:
    study = received_phantom(store, settings, tmp_path, seed=23)
    outcome = annotator(store, settings, None).annotate(study.study_uid, 1, spec)
    assert outcome.state == AnnotationState.QUEUED
    with store.read() as session:
        row = session.scalars(select(Annotation)).one()
    assert row.seg_sop_instance_uid is None and row.series_uid == study.series_uid


def test_the_same_revision_annotated_twice_at_once_keeps_one_draft(
    store: Store, settings: Settings, spec: ModelSpec, tmp_path: Path
) -> None:
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=24)
    outcomes: list[int] = []
    workers = [
        threading.Thread(
            target=lambda: outcomes.append(
                annotator(store, settings, None).annotate(study.study_uid, 1, spec).annotation_id
            )
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert len(outcomes) == 2 and outcomes[0] == outcomes[1]
    with store.read() as session:
        assert session.scalar(select(func.count(Annotation.id))) == 1
    drafts = list((settings.data_dir / "drafts" / study.study_uid).glob("*/*.dcm"))
    assert len(drafts) == 1  # the loser's files are removed
