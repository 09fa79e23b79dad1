"""The review service's API on a real store with real drafts: every state change a reader or
reviewer makes, and every refusal, through HTTP as clients send it."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

import agents.review.training_set as training_set
from agents.nifti import read_label_map, read_nifti, write_nifti
from agents.review.auth import Users
from dicom_listener import Ingestor, InstanceHeader
from radloop.app.phantoms import WrittenStudy
from radloop.db import Annotation, Label, OutboxEvent, Store
from radloop.domain import IngestSource, Role
from tests.dicom_files import generated_ct
from tests.drafted import correction_seg, reference_dice
from tests.review_cases import Review

# Every case is drafted by in-process inference first (minutes in all).
pytestmark = pytest.mark.slow


def truth_nifti(study: WrittenStudy) -> bytes:
    return study.truth.read_bytes()


def truth_labels(study: WrittenStudy) -> np.ndarray[Any, Any]:
    return read_label_map(study.truth)


def events(store: Store, name: str) -> list[dict[str, Any]]:
    with store.read() as session:
        return [
            row.payload
            for row in session.scalars(select(OutboxEvent).where(OutboxEvent.event == name))
        ]


def seg_bytes(
    review: Review,
    study: WrittenStudy,
    labels: np.ndarray[Any, Any],
    *,
    names: list[str] | None = None,
) -> bytes:
    return correction_seg(
        review.store, review.settings, review.spec, study, labels, review.tmp_path, names=names
    )


# -- worklist, claims, leases -----------------------------------------------------------


def test_worklist_is_ordered_by_uncertainty_and_an_urgent_case_jumps_ahead(
    review: Review,
) -> None:
    first, _ = review.drafted(31)
    second, _ = review.drafted(32)
    with review.store.transaction() as session:
        session.get_one(Annotation, first).scores = {"entropy": 0.2}
        session.get_one(Annotation, second).scores = {"entropy": 0.5}
    ann, rita = review.client("ann"), review.client("rita")
    listed = ann.get("/api/worklist").json()
    assert [item["annotation_id"] for item in listed] == [second, first]
    assert [item["rank"] for item in listed] == [1, 2]
    assert listed[0]["selection"] == {"rank": 1, "strategy": "entropy", "seed": 0, "value": 0.5}

    assert ann.put(f"/api/annotations/{first}/urgent", json={"urgent": True}).status_code == 403
    marked = rita.put(f"/api/annotations/{first}/urgent", json={"urgent": True})
    assert marked.status_code == 200
    # Shown first, but not as the strategy's choice: urgency stays outside the learning order.
    assert marked.json()["rank"] == 1 and marked.json()["selection"]["strategy"] == "urgent"
    listed = ann.get("/api/worklist").json()
    assert [item["annotation_id"] for item in listed] == [first, second]
    assert listed[0]["study_date"] and listed[0]["model_version"] == "1"
    assert ann.get("/api/counts").json()["drafted"] == 2


def test_claim_is_exclusive_until_released(review: Review) -> None:
    case, _ = review.drafted(33)
    ann, bob = review.client("ann"), review.client("bob")
    claimed = ann.post(f"/api/annotations/{case}/claim")
    assert claimed.status_code == 200
    assert claimed.json()["state"] == "claimed" and claimed.json()["claimed_by"] == "ann"

    refused = bob.post(f"/api/annotations/{case}/claim")
    assert refused.status_code == 409 and "held by ann" in refused.json()["detail"]
    assert bob.post(f"/api/annotations/{case}/release").status_code == 409
    assert ann.post(f"/api/annotations/{case}/claim").status_code == 200  # renews

    released = ann.post(f"/api/annotations/{case}/release")
    assert released.json()["state"] == "drafted" and released.json()["claimed_by"] is None
    assert bob.post(f"/api/annotations/{case}/claim").json()["claimed_by"] == "bob"
    assert review.client("mo").post(f"/api/annotations/{case}/claim").status_code == 403
    assert review.client().post(f"/api/annotations/{case}/claim").status_code == 401
    assert ann.post("/api/annotations/999999/claim").status_code == 404


def test_an_abandoned_claim_returns_to_the_worklist_and_a_late_save_is_refused(
    review: Review,
) -> None:
    case, study = review.drafted(34)
    ann, bob = review.client("ann"), review.client("bob")
    assert ann.post(f"/api/annotations/{case}/claim").status_code == 200
    review.skew = timedelta(minutes=review.settings.review.lease_minutes, seconds=1)
    listed = {item["annotation_id"]: item for item in bob.get("/api/worklist").json()}
    assert listed[case]["state"] == "drafted" and listed[case]["claimed_by"] is None

    late = ann.put(f"/api/annotations/{case}/label", content=truth_nifti(study))
    assert late.status_code == 409 and "lease" in late.json()["detail"]
    assert "expired" in late.json()["detail"]
    assert bob.post(f"/api/annotations/{case}/claim").json()["claimed_by"] == "bob"


def _claim_at_once(review: Review, case: int) -> dict[str, int]:
    """ann and bob claim `case` at the same instant; each one's HTTP status."""
    clients = {"ann": review.client("ann"), "bob": review.client("bob")}
    barrier = threading.Barrier(len(clients))
    statuses: dict[str, int] = {}

    def claim(user: str) -> None:
        barrier.wait()
        statuses[user] = clients[user].post(f"/api/annotations/{case}/claim").status_code

    threads = [threading.Thread(target=claim, args=(user,)) for user in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_two_readers_claiming_at_once_exactly_one_wins(review: Review) -> None:
    for case in (review.drafted(35)[0], review.drafted(36)[0]):
        statuses = _claim_at_once(review, case)
        assert sorted(statuses.values()) == [200, 409]
        winner = next(user for user, status in statuses.items() if status == 200)
        with review.store.read() as session:
            assert session.get_one(Annotation, case).claimed_by == winner


# -- corrections and validation -----------------------------------------------------------


def test_nifti_correction_then_a_reviewer_validates_it_into_the_training_set(
    review: Review,
) -> None:
    case, study = review.drafted(37)
    ann, rita = review.client("ann"), review.client("rita")
    ann.post(f"/api/annotations/{case}/claim")
    saved = ann.put(f"/api/annotations/{case}/label", content=truth_nifti(study))
    assert saved.status_code == 200, saved.text
    body = saved.json()
    with review.store.read() as session:
        draft_nifti = session.get_one(Annotation, case).nifti_path
    assert draft_nifti is not None
    expected = reference_dice(read_label_map(Path(draft_nifti)), truth_labels(study), review.spec)
    assert body["state"] == "corrected" and body["corrected_by"] == "ann"
    assert body["correction_dice"] == pytest.approx(expected)
    corrected = events(review.store, "radloop.annotation.corrected")
    assert [e["annotation_id"] for e in corrected] == [case]
    assert corrected[0]["dice"] == pytest.approx(expected)
    # The NIfTI upload is also kept as a MANUAL SEG a viewer can show.
    corrections = (
        review.settings.drafts_dir / study.study_uid / "corrections" / f"annotation-{case}"
    )
    seg = dcmread(corrections / f"{body['correction_sop_instance_uid']}.dcm")
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"

    assert ann.post(f"/api/annotations/{case}/validate").status_code == 403  # a reader
    validated = rita.post(f"/api/annotations/{case}/validate")
    assert validated.status_code == 200, validated.text
    assert validated.json()["state"] == "validated"
    assert validated.json()["validated_by"] == "rita"
    with review.store.read() as session:
        label = session.scalars(select(Label).where(Label.annotation_id == case)).one()
    assert label.split in ("train", "holdout") and label.model_name == review.spec.name
    assert np.array_equal(read_label_map(Path(label.label_path)), read_label_map(study.truth))
    assert Path(label.image_path).is_file()
    assert [e["label_id"] for e in events(review.store, "radloop.label.validated")] == [label.id]
    again = rita.post(f"/api/annotations/{case}/validate")
    assert again.status_code == 409


def test_ingest_of_another_study_goes_on_while_a_validated_label_is_written(
    review: Review, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Validation gzip-writes the whole series into the training set; on SQLite a write
    transaction around that would hold the one write lock ingest needs for seconds."""
    case, study = review.drafted(41)
    ann, rita = review.client("ann"), review.client("rita")
    ann.post(f"/api/annotations/{case}/claim")
    assert ann.put(f"/api/annotations/{case}/label", content=truth_nifti(study)).status_code == 200
    arriving = generated_ct(tmp_path / "arriving", 3, seed=4)
    ingested: list[str] = []

    def ingest_arriving() -> None:
        ingestor = Ingestor(review.store, review.settings.spool_dir)
        for path in arriving:
            ds = dcmread(path)
            header = InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
            ingestor.ingest(header, path.read_bytes(), IngestSource.DIMSE)
            ingested.append(header.sop_instance_uid)

    written = write_nifti

    def write_while_a_study_arrives(path: Path, array: Any, affine: Any) -> None:
        arrival = threading.Thread(target=ingest_arriving)
        arrival.start()
        arrival.join(timeout=10)
        written(path, array, affine)

    monkeypatch.setattr(training_set, "write_nifti", write_while_a_study_arrives)
    validated = rita.post(f"/api/annotations/{case}/validate")
    assert validated.status_code == 200, validated.text
    assert len(ingested) == len(arriving)  # stored while the label was being written


def test_the_corrector_cannot_validate_their_own_correction(review: Review) -> None:
    case, study = review.drafted(38)
    rita = review.client("rita")
    rita.post(f"/api/annotations/{case}/claim")
    assert rita.put(f"/api/annotations/{case}/label", content=truth_nifti(study)).status_code == 200
    refused = rita.post(f"/api/annotations/{case}/validate")
    assert refused.status_code == 409 and "second person" in refused.json()["detail"]


def test_single_reader_mode_validates_on_save(review: Review) -> None:
    single = review.settings.review.model_copy(update={"single_reader": True})
    review.settings = review.settings.model_copy(update={"review": single})
    case, study = review.drafted(39)
    ann = review.client("ann")
    ann.post(f"/api/annotations/{case}/claim")
    saved = ann.put(
        f"/api/annotations/{case}/label", content=seg_bytes(review, study, truth_labels(study))
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["state"] == "validated" and saved.json()["validated_by"] == "ann"
    assert saved.json()["correction_dice"] < 1.0  # an untrained draft needed correcting
    assert len(events(review.store, "radloop.label.validated")) == 1


def test_accepting_a_draft_records_it_as_its_own_correction(review: Review) -> None:
    case, _ = review.drafted(40)
    ann = review.client("ann")
    ann.post(f"/api/annotations/{case}/claim")
    accepted = ann.post(f"/api/annotations/{case}/accept")
    if accepted.status_code == 422:  # an untrained network may draft nothing at all
        assert "empty" in accepted.json()["detail"]
        return
    assert accepted.json()["state"] == "corrected"
    assert accepted.json()["correction_dice"] == 1.0


# -- refusals change nothing ------------------------------------------------------------


def test_bad_labels_are_refused_with_the_reason_and_change_nothing(review: Review) -> None:
    case, study = review.drafted(41)
    _, other = review.drafted(42)
    ann = review.client("ann")
    url = f"/api/annotations/{case}/label"
    assert ann.put(url, content=truth_nifti(study)).status_code == 409  # not claimed yet
    ann.post(f"/api/annotations/{case}/claim")
    truth = truth_labels(study)

    def refused(content: bytes) -> tuple[int, str]:
        answer = ann.put(url, content=content)
        return answer.status_code, answer.json()["detail"]

    status, why = refused(seg_bytes(review, other, truth_labels(other)))
    assert status == 422 and "another study" in why
    status, why = refused(seg_bytes(review, study, truth, names=["Liver", "Spleen", "Tumour"]))
    assert status == 422 and "unknown segment label 'Tumour'" in why
    status, why = refused(_nifti(np.zeros_like(truth), study))
    assert status == 422 and "empty" in why
    status, why = refused(_nifti(truth[:, :, :-4], study))
    assert status == 422 and "grid" in why
    status, why = refused(_nifti(np.where(truth > 0, 9, 0), study))
    assert status == 422 and "unknown label values [9]" in why
    status, why = refused(b"patient list\n" * 40)
    assert status == 415 and "neither a DICOM SEG" in why
    ct_slice = next(study.dicom_dir.glob("*.dcm")).read_bytes()
    status, why = refused(ct_slice)
    assert status == 422 and "not a DICOM SEG" in why

    with review.store.read() as session:
        annotation = session.get_one(Annotation, case)
        assert annotation.state == "claimed" and annotation.claimed_by == "ann"
        assert annotation.correction_dice is None
    assert events(review.store, "radloop.annotation.corrected") == []
    # ... and the good label still goes through afterwards.
    assert ann.put(url, content=truth_nifti(study)).status_code == 200


def _nifti(labels: np.ndarray[Any, Any], study: WrittenStudy) -> bytes:
    """`labels` (slice, row, column) on the study's grid as NIfTI bytes (RAS, like truth)."""
    affine = nib.nifti1.load(study.truth).affine  # type: ignore[no-untyped-call]
    image = nib.Nifti1Image(labels.astype(np.uint8).transpose(2, 1, 0), affine)  # type: ignore[no-untyped-call]
    return bytes(image.to_bytes())


def test_a_nifti_in_another_orientation_of_the_same_grid_is_accepted(review: Review) -> None:
    case, study = review.drafted(43)
    truth = truth_labels(study)
    ras = nib.nifti1.load(study.truth)  # type: ignore[no-untyped-call]
    lps = nib.Nifti1Image(  # type: ignore[no-untyped-call]
        np.asarray(ras.dataobj)[::-1, ::-1, :],
        ras.affine
        @ np.array(
            [
                [-1, 0, 0, truth.shape[2] - 1],
                [0, -1, 0, truth.shape[1] - 1],
                [0, 0, 1, 0],
                [0, 0, 0, 1],
            ]
        ),
    )
    ann = review.client("ann")
    ann.post(f"/api/annotations/{case}/claim")
    saved = ann.put(f"/api/annotations/{case}/label", content=bytes(lps.to_bytes()))
    assert saved.status_code == 200, saved.text
    with review.store.read() as session:
        stored = session.get_one(Annotation, case).correction_path
    assert stored is not None and np.array_equal(read_label_map(Path(stored)), truth)


def _nrrd(labels: np.ndarray[Any, Any], study: WrittenStudy, **fields: Any) -> bytes:
    """`labels` (slice, row, column) on the study's grid as a 3D Slicer-style NRRD in RAS,
    with extra header `fields` (a `.seg.nrrd`'s segment names)."""
    _, affine = read_nifti(study.truth)  # radloop's (slice, row, column) -> LPS
    header = {
        "space": "right-anterior-superior",
        "space directions": (affine[:3, 2::-1].T * [-1, -1, 1]),
        "space origin": affine[:3, 3] * [-1, -1, 1],
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
        **fields,
    }
    out = io.BytesIO()
    nrrd.write(out, np.ascontiguousarray(labels, dtype=np.uint8), header, index_order="C")
    return out.getvalue()


def test_nrrd_labels_from_slicer_are_taken_by_value_or_by_segment_name(review: Review) -> None:
    """3D Slicer's MONAI Label module uploads `.nrrd` or `.seg.nrrd` when so configured."""
    (case, study), (named_case, named_study) = review.drafted(44), review.drafted(45)
    ann = review.client("ann")
    for annotation in (case, named_case):
        assert ann.post(f"/api/annotations/{annotation}/claim").status_code == 200
    truth = truth_labels(study)

    def put(annotation: int, content: bytes) -> tuple[int, str]:
        answer = ann.put(f"/api/annotations/{annotation}/label", content=content)
        return answer.status_code, answer.text

    detached = (  # its data would be read from a path on the server
        b"NRRD0004\ntype: uint8\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 4 4\n"
        b"space directions: (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\ndata file: /etc/hostname\n\n"
    )
    status, why = put(case, detached)
    assert status == 422 and "detached data file" in why
    status, why = put(case, _nrrd(truth[:, :, :-2], study))
    assert status == 422 and "NRRD's grid" in why
    status, why = put(case, _nrrd(truth, study, Segment0_Name="Tumour", Segment0_LabelValue="1"))
    assert status == 422 and "unknown segment 'Tumour'" in why
    status, why = put(case, _nrrd(truth, study))
    assert status == 200, why

    # A .seg.nrrd stores its own values (here 11, 12, ...) and names each segment.
    named_truth = truth_labels(named_study)
    fields = {}
    for index, label in enumerate(reversed(review.spec.labels)):
        fields[f"Segment{index}_Name"] = label.name.lower()
        fields[f"Segment{index}_LabelValue"] = str(label.value + 10)
    stored_values = np.where(named_truth > 0, named_truth + 10, 0)
    status, why = put(named_case, _nrrd(stored_values, named_study, **fields))
    assert status == 200, why
    for annotation, expected in ((case, truth), (named_case, named_truth)):
        with review.store.read() as session:
            stored = session.get_one(Annotation, annotation).correction_path
        assert stored is not None and np.array_equal(read_label_map(Path(stored)), expected)


# -- pages, login, CSRF ------------------------------------------------------------------


@pytest.fixture
def browser(review: Review) -> Iterator[TestClient]:
    Users(review.store).add("page-reader", Role.READER, password="correct horse battery")
    client = review.client()
    yield client


def _csrf(html: str) -> str:
    marker = 'name="csrf_token" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def test_pages_need_a_login_and_forms_need_the_csrf_token(
    review: Review, browser: TestClient
) -> None:
    case, _ = review.drafted(44)
    page = browser.get("/worklist")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/worklist"
    wrong = browser.post(
        "/login", data={"username": "page-reader", "password": "nope", "next": "/worklist"}
    )
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    logged = browser.post(
        "/login",
        data={"username": "page-reader", "password": "correct horse battery", "next": "//evil"},
    )
    assert logged.status_code == 303 and logged.headers["location"] == "/worklist"
    cookie = logged.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie

    html = browser.get("/worklist").text
    assert f'data-annotation="{case}"' in html and "page-reader (reader)" in html
    forged = browser.post(f"/worklist/{case}/claim", data={"csrf_token": "guess"})
    assert forged.status_code == 403
    no_header = browser.post(f"/api/annotations/{case}/claim")
    assert no_header.status_code == 403 and "CSRF" in no_header.json()["detail"]
    opened = browser.post(f"/worklist/{case}/open", data={"csrf_token": _csrf(html)})
    assert opened.status_code == 303
    assert opened.headers["location"].startswith("/segmentation?StudyInstanceUIDs=")
    assert (
        review.client("ann").get(f"/api/annotations/{case}").json()["claimed_by"] == "page-reader"
    )

    dashboard = browser.get("/dashboard")
    assert dashboard.status_code == 200
    for plot in ("validated", "queue", "effort", "clicks", "labels"):
        svg = browser.get(f"/dashboard/{plot}.svg")
        assert svg.status_code == 200 and svg.text.lstrip().startswith("<?xml")
    assert "no refined corrections yet" in browser.get("/dashboard/clicks.svg").text
    assert "no training run judged yet" in browser.get("/dashboard/labels.svg").text
    assert review.client().get("/dashboard/queue.svg").status_code == 303
    assert review.client().get("/api/worklist").status_code == 401


def test_openapi_documents_the_api(review: Review) -> None:
    spec = review.client().get("/openapi.json").json()
    assert "/api/annotations/{annotation_id}/label" in spec["paths"]
    assert review.client().get("/docs").status_code == 200
