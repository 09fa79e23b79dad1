"""The review service as its own process in front of a real Orthanc: the authenticated DICOMweb
proxy OHIF reads through, and a corrected SEG saved the way OHIF saves it (STOW-RS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from pyorthanc import Orthanc
from sqlalchemy import select

from agents.nifti import read_label_map
from agents.review.audit import AuditLog
from agents.review.auth import Users
from radloop.app.phantoms import WrittenStudy
from radloop.app.supervisor import Child
from radloop.db import Annotation, Store, Study, utcnow
from radloop.domain import Role
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import Settings
from tests.conftest_marks import ONCE
from tests.drafted import annotator, correction_seg, received_phantom, reference_dice, stow_body
from tests.models import export_version

# HTTP between OHIF, the proxy and Orthanc; the claims behind it run on PostgreSQL in
# test_review.py: this module runs in the SQLite pass only.
pytestmark = ONCE


@dataclass
class Proxied:
    url: str
    study: WrittenStudy
    annotation_id: int
    tokens: dict[str, str]
    orthanc: Orthanc

    def client(self, user: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture
def proxied(settings: Settings, store: Store, review_service: Child, tmp_path: Path) -> Proxied:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    orthanc = Orthanc(settings.orthanc.base_url)
    study = received_phantom(store, settings, tmp_path, seed=51)
    # The annotator stores the received study and its draft in Orthanc for the viewer.
    outcome = annotator(store, settings, orthanc).annotate(study.study_uid, 1, spec)
    users = Users(store)
    tokens = {"ann": users.add("ann", Role.READER), "mo": users.add("mo", Role.ML_ENGINEER)}
    return Proxied(review_service.spec.url, study, outcome.annotation_id, tokens, orthanc)


def test_dicomweb_reads_need_a_role_come_from_orthanc_and_are_audited_as_views(
    proxied: Proxied, store: Store
) -> None:
    assert proxied.client().get("/dicom-web/studies").status_code == 401
    # Only DICOMweb: an encoded ".." arrives decoded, and reached Orthanc's REST API (every
    # patient's name) until the proxy refused it (found by tests/test_fuzz_api.py).
    for escape in ("%2E%2E/patients", "studies/%2E%2E/%2E%2E/patients", "%2E%2E/system"):
        answer = proxied.client("mo").get(f"/dicom-web/{escape}")
        assert answer.status_code == 404, (escape, answer.status_code, answer.text[:200])
    studies = proxied.client("mo").get("/dicom-web/studies")
    assert studies.status_code == 200
    uids = [item["0020000D"]["Value"][0] for item in studies.json()]
    assert uids == [proxied.study.study_uid]
    retrieve = studies.json()[0]["00081190"]["Value"][0]
    assert retrieve.startswith(proxied.url + "/dicom-web/studies/"), retrieve

    series = proxied.client("mo").get(f"/dicom-web/studies/{proxied.study.study_uid}/series")
    modalities = sorted(item["00080060"]["Value"][0] for item in series.json())
    assert modalities == ["CT", "SEG"]  # the images and radloop's draft
    metadata = proxied.client("ann").get(
        f"/dicom-web/studies/{proxied.study.study_uid}/series/{proxied.study.series_uid}/metadata"
    )
    assert metadata.status_code == 200 and len(metadata.json()) == proxied.study.slices
    again = f"/dicom-web/studies/{proxied.study.study_uid}/series"
    assert proxied.client("mo").get(again).status_code == 200

    # Reading a study's instances is a view in the audit log: once per user and study, by
    # internal id; a search (`/studies`) opens nothing.
    with store.read() as session:
        study_id = session.scalar(
            select(Study.id).where(Study.study_uid == proxied.study.study_uid)
        )
    views = [(e["user"], e["action"], e["study_id"]) for e in AuditLog(store, utcnow).events()]
    assert views == [("ann", "view", study_id), ("mo", "view", study_id)]


def test_a_seg_saved_through_the_proxy_becomes_the_correction_and_reaches_orthanc(
    proxied: Proxied, settings: Settings, store: Store, tmp_path: Path
) -> None:
    spec: ModelSpec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    truth = read_label_map(proxied.study.truth)
    seg = correction_seg(store, settings, spec, proxied.study, truth, tmp_path / "ohif")
    body, content_type = stow_body(seg)
    ann = proxied.client("ann")
    headers = {"content-type": content_type, "accept": "application/dicom+json"}

    early = ann.post("/dicom-web/studies", content=body, headers=headers)
    assert early.status_code == 409 and "claim" in early.json()["detail"]
    assert (
        proxied.client("mo").post("/dicom-web/studies", content=body, headers=headers).status_code
        == 403
    )

    assert ann.post(f"/api/annotations/{proxied.annotation_id}/claim").status_code == 200
    saved = ann.post("/dicom-web/studies", content=body, headers=headers)
    assert saved.status_code == 200, saved.text
    with store.read() as session:
        annotation = session.get_one(Annotation, proxied.annotation_id)
        assert annotation.state == "corrected" and annotation.corrected_by == "ann"
        assert annotation.nifti_path is not None
        expected = reference_dice(read_label_map(Path(annotation.nifti_path)), truth, spec)
        assert annotation.correction_dice == pytest.approx(expected)
        sop_uid = annotation.correction_sop_instance_uid
    found = httpx.post(f"{settings.orthanc.base_url}/tools/lookup", content=str(sop_uid))
    assert [item["Type"] for item in found.json()] == ["Instance"]

    again = ann.post("/dicom-web/studies", content=body, headers=headers)
    assert again.status_code == 200  # a retried save is harmless


def test_a_seg_that_does_not_fit_the_draft_is_refused_and_not_forwarded(
    proxied: Proxied, settings: Settings, store: Store, tmp_path: Path
) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    ann = proxied.client("ann")
    ann.post(f"/api/annotations/{proxied.annotation_id}/claim")
    good = correction_seg(
        store, settings, spec, proxied.study, read_label_map(proxied.study.truth), tmp_path
    )
    renamed = correction_seg(
        store,
        settings,
        spec,
        proxied.study,
        read_label_map(proxied.study.truth),
        tmp_path,
        names=["Liver", "Spleen", "Lesion"],
    )
    before = len(proxied.orthanc.get_instances())
    body, content_type = stow_body(renamed)
    refused = ann.post("/dicom-web/studies", content=body, headers={"content-type": content_type})
    assert refused.status_code == 422 and "unknown segment label 'Lesion'" in refused.text
    not_multipart = ann.post(
        "/dicom-web/studies", content=good, headers={"content-type": "application/dicom"}
    )
    assert not_multipart.status_code == 415
    assert len(proxied.orthanc.get_instances()) == before
    with store.read() as session:
        assert session.get_one(Annotation, proxied.annotation_id).state == "claimed"


def test_the_viewer_is_served_with_a_config_pointing_at_the_proxy(
    proxied: Proxied, settings: Settings
) -> None:
    config = proxied.client().get("/app-config.js")
    assert config.status_code == 200 and "window.location.origin + '/dicom-web'" in config.text
    viewer = proxied.client().get(
        f"/segmentation?StudyInstanceUIDs={proxied.study.study_uid}", follow_redirects=False
    )
    assert viewer.status_code == 303 and viewer.headers["location"].startswith("/login?next=")
    bundle = next(p.name for p in settings.ohif_dir.glob("app.bundle.*.js"))
    assert proxied.client().get(f"/{bundle}").status_code == 200
    escape = proxied.client().get("/%2e%2e/%2e%2e/%2e%2e/etc/passwd")
    assert escape.status_code in (303, 404) and "root:" not in escape.text


def test_the_ai_viewer_is_served_behind_login_with_the_monailabel_cookies_and_its_dicomweb(
    proxied: Proxied, settings: Settings
) -> None:
    """OHIF with MONAI Label's panel at /ohif/: its config reads DICOMweb from /proxy/dicom/,
    which needs a role like /dicom-web; its page needs a login and sets the cookies the
    panel reads (radloop's /monailabel/ and the CSRF token axios sends back)."""
    anonymous = proxied.client()
    config = anonymous.get("/ohif/app-config.js")
    assert config.status_code == 200 and 'routerBasename": "/ohif/"' in config.text
    assert "window.location.origin + '/proxy/dicom/qido'" in config.text
    bundle = next(p.name for p in settings.ohif_ai_dir.glob("app.bundle.*.js"))
    assert anonymous.get(f"/ohif/{bundle}").status_code == 200
    page = f"/ohif/monai-label?StudyInstanceUIDs={proxied.study.study_uid}"
    redirected = anonymous.get(page, follow_redirects=False)
    assert redirected.status_code == 303 and redirected.headers["location"].startswith("/login")
    assert anonymous.get("/proxy/dicom/qido/studies").status_code == 401

    with httpx.Client(base_url=proxied.url, timeout=60, follow_redirects=True) as browser:
        login = {"username": "ann", "password": proxied.tokens["ann"], "next": page}
        opened = browser.post("/login", data=login)
        assert opened.status_code == 200  # followed to the page
        # Its own policy: MONAI Label's OHIF compiles WebAssembly, and is never framed.
        policy = opened.headers["content-security-policy"]
        assert "'wasm-unsafe-eval'" in policy and "frame-ancestors 'none'" in policy
        cookies = browser.cookies
        assert unquote(cookies["MONAILABEL_SERVER_URL"]) == f"{proxied.url}/monailabel/"
        assert cookies["XSRF-TOKEN"]
        studies = browser.get("/proxy/dicom/qido/studies")
        assert [s["0020000D"]["Value"][0] for s in studies.json()] == [proxied.study.study_uid]
        frames = browser.get(
            f"/proxy/dicom/wado/studies/{proxied.study.study_uid}/series/"
            f"{proxied.study.series_uid}/metadata"
        )
        assert frames.status_code == 200 and len(frames.json()) == proxied.study.slices
        # A state change on the session cookie needs the CSRF token back (axios's header).
        claim = f"/api/annotations/{proxied.annotation_id}/claim"
        assert browser.post(claim).status_code == 403
        held = browser.post(claim, headers={"x-xsrf-token": cookies["XSRF-TOKEN"]})
        assert held.status_code == 200 and held.json()["claimed_by"] == "ann"
