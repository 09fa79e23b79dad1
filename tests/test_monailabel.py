"""MONAI Label's own client against radloop's `/monailabel/` API, as 3D Slicer's module uses
it: token auth on radloop's users, next sample from the worklist (claimed), the draft as auto
segmentation, click-guided refinement by the interactive model on a real Triton, the label
saved as the case's correction; and the requests a client gets wrong, refused with the reason
and changing nothing.

`MONAILabelClient` comes from the pinned `monailabel` wheel that scripts/bootstrap unpacks
into `.cache/` (its client only: its pins never touch radloop's environment).

Set-up shortcut: studies are ingested and drafted in-process (`tests.drafted`) with the
in-process backend; test_scp, test_annotator and test_up cover that path with storescu and
Triton.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from agents.nifti import read_label_map
from agents.review.auth import Users
from agents.volume import load_series, series_files
from model_registry.inference import TritonBackend
from model_registry.repository import model_repository
from model_registry.triton_model.clicks import refine
from model_registry.triton_model.model import load
from radloop.app.supervisor import Child
from radloop.db import Annotation, Interaction, OutboxEvent, Store
from radloop.domain import AnnotationState, Role
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import PROJECT_ROOT, Settings
from tests.conftest_marks import ONCE
from tests.drafted import annotator, received_phantom
from tests.models import export_interactive, export_version

# A real Triton and review service; the claims and corrections behind the API run on
# PostgreSQL in test_review.py: this module runs in the SQLite pass only.
pytestmark = [pytest.mark.slow, ONCE]

CLIENT_DIR = PROJECT_ROOT / ".cache" / "monailabel-0.8.5" / "client"
PASSWORD = "correct horse battery staple"


def monailabel_client() -> ModuleType:
    if not (CLIENT_DIR / "monailabel" / "client" / "client.py").is_file():
        pytest.fail(f"{CLIENT_DIR} is missing: run scripts/bootstrap")
    sys.path.insert(0, str(CLIENT_DIR))
    try:
        return importlib.import_module("monailabel.client.client")
    finally:
        sys.path.remove(str(CLIENT_DIR))


@dataclass
class Site:
    url: str
    spec: ModelSpec
    settings: Settings
    store: Store
    cases: dict[str, int]  # series UID -> annotation id
    truth: dict[str, Path]  # series UID -> phantom truth NIfTI
    ml: ModuleType

    def client(self, user: str | None, tmp_path: Path) -> Any:
        folder = tmp_path / f"client-{user}"
        folder.mkdir(exist_ok=True)
        client = self.ml.MONAILabelClient(f"{self.url}/monailabel/", tmpdir=str(folder))
        if user is not None:
            client.update_auth(client.auth_token(user, PASSWORD))
        return client

    def annotation(self, series_uid: str) -> Annotation:
        with self.store.read() as session:
            return session.get_one(Annotation, self.cases[series_uid])

    def interactions(self) -> int:
        with self.store.read() as session:
            return int(session.scalar(select(func.count()).select_from(Interaction)) or 0)


@pytest.fixture
def site(
    settings: Settings, store: Store, triton: Child, review_service: Child, tmp_path: Path
) -> Iterator[Site]:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    export_interactive(settings, spec)
    backend = TritonBackend(settings.triton.base_url)
    backend.load(spec.name)
    backend.load(str(spec.interactive_name))
    cases: dict[str, int] = {}
    truth: dict[str, Path] = {}
    for seed in (61, 62):
        study = received_phantom(store, settings, tmp_path, seed=seed)
        outcome = annotator(store, settings, None).annotate(study.study_uid, 1, spec)
        cases[study.series_uid] = outcome.annotation_id
        truth[study.series_uid] = study.truth
    users = Users(store)
    users.add("ann", Role.READER, password=PASSWORD)
    users.add("bob", Role.READER, password=PASSWORD)
    users.add("mo", Role.ML_ENGINEER, password=PASSWORD)
    yield Site(review_service.spec.url, spec, settings, store, cases, truth, monailabel_client())


def _click_that_changes(site: Site, series_uid: str) -> tuple[str, list[int]]:
    """A Liver click ([i, j, k]) where the served interactive version, run here on the same
    inputs, turns a voxel that is not Liver in the draft into Liver."""
    series = load_series(series_files(site.store, site.settings.spool_dir, series_uid))
    draft = read_label_map(Path(str(site.annotation(series_uid).nifti_path)))
    truth = read_label_map(site.truth[series_uid])
    repository = model_repository(site.settings)
    name = str(site.spec.interactive_name)
    with repository.version_folder(name, int(repository.champion(name) or 0)) as folder:
        network, config = load(folder, torch.device("cpu"))
    missed = np.argwhere((truth == 1) & (draft != 1))
    for s, r, c in missed[:: max(1, len(missed) // 40)]:
        labels = refine(network, series.array, np.array([[1, s, r, c]]), draft, config)
        if labels[s, r, c] == 1:
            return "Liver", [int(c), int(r), int(s)]
    pytest.fail("the interactive model follows no Liver click on this draft")


def test_monailabel_client_connects_takes_the_next_case_refines_with_clicks_and_saves(
    site: Site, tmp_path: Path
) -> None:
    ml = site.ml
    anonymous = site.client(None, tmp_path)
    assert anonymous.auth_enabled()
    with pytest.raises(ml.MONAILabelClientException, match="401"):
        anonymous.info()
    with pytest.raises(ml.MONAILabelClientException, match="401"):
        anonymous.auth_token("ann", "wrong")

    ann = site.client("ann", tmp_path)
    info = ann.info()
    assert "config" not in info  # Slicer refuses a server whose info has one
    assert set(info["labels"]) >= {"Liver", "Spleen", "Kidney"}
    models = info["models"]
    assert models["phantom-abdomen"]["type"] == "segmentation"
    assert models["phantom-abdomen-deepedit"]["type"] == "deepedit"
    assert models["phantom-abdomen-deepedit"]["labels"]["Liver"] == 1
    assert "worklist" in info["strategies"]
    assert ann.datastore()["total"] == 2

    # Next sample: the top of the worklist, claimed for ann; bob gets the other case.
    image = ann.next_sample("worklist", {})["id"]
    assert site.annotation(image).claimed_by == "ann"
    assert ann.next_sample("worklist", {})["id"] == image  # what ann holds, lease renewed
    bob = site.client("bob", tmp_path)
    other = bob.next_sample("worklist", {})["id"]
    assert other != image and site.annotation(other).claimed_by == "bob"

    # Auto segmentation: the case's draft, on the series' grid.
    path, params = ann.infer("phantom-abdomen", image, {})
    draft = read_label_map(Path(str(site.annotation(image).nifti_path)))
    assert np.array_equal(read_label_map(Path(path)), draft)
    assert params["label_names"]["Liver"] == 1
    # As OHIF's panel asks: uint8 NRRD, column fastest, on the series' grid (LPS).
    path, _ = ann.infer("phantom-abdomen", image, {"result_extension": ".nrrd"})
    voxels, header = nrrd.read(path, index_order="C")
    assert path.endswith(".nrrd") and header["type"] == "uint8"
    assert np.array_equal(voxels, draft) and header["space"] == "left-posterior-superior"

    # A Liver click: Triton's interactive model turns the clicked voxel into Liver.
    label, (i, j, k) = _click_that_changes(site, image)
    path, params = ann.infer("phantom-abdomen-deepedit", image, {label: [[i, j, k]]})
    refined = read_label_map(Path(path))
    assert refined.shape == draft.shape and refined[k, j, i] == 1 and draft[k, j, i] != 1
    assert params["clicks"] == 1 and params["model_version"] == "1"
    with site.store.read() as session:
        recorded = session.scalars(select(Interaction)).one()
    assert (recorded.user_name, recorded.clicks) == ("ann", [[1, k, j, i]])

    # Requests a client gets wrong: refused with the reason, nothing changes.
    before = (site.interactions(), site.annotation(image).state, site.annotation(other).state)
    refusals: list[tuple[Callable[[], Any], str, str]] = [
        (lambda: ann.infer("no-such-model", image, {}), "404", "unknown model"),
        (
            lambda: ann.infer("phantom-abdomen-deepedit", image, {"Liver": [[i, j, 999]]}),
            "422",
            "outside the image",
        ),
        (
            lambda: ann.infer("phantom-abdomen-deepedit", image, {"Lung": [[i, j, k]]}),
            "422",
            "unknown label",
        ),
        (
            lambda: ann.infer("phantom-abdomen-deepedit", other, {"Liver": [[i, j, k]]}),
            "409",
            "held by bob",
        ),
        (
            lambda: site.client("mo", tmp_path).infer(
                "phantom-abdomen-deepedit", image, {"Liver": [[i, j, k]]}
            ),
            "403",
            "may not",
        ),
        (lambda: anonymous.next_sample("worklist", {}), "401", ""),
        (lambda: ann.next_sample("no-such-strategy", {}), "404", "unknown strategy"),
    ]
    for call, status, reason in refusals:
        with pytest.raises(ml.MONAILabelClientException, match=status) as refused:
            call()
        assert reason in str(refused.value)
    # A label on another series' grid is refused by the intake's check.
    other_grid = tmp_path / "other.nii.gz"
    other_truth = nib.nifti1.load(site.truth[other])  # type: ignore[no-untyped-call]
    nib.save(other_truth, other_grid)
    with pytest.raises(ml.MONAILabelClientException, match="422"):
        ann.save_label(image, str(other_grid), tag="final")
    assert (
        site.interactions(),
        site.annotation(image).state,
        site.annotation(other).state,
    ) == before

    # Bob refines his case and accepts the refinement without a file (what the worklist's
    # "Accept refined label" does for OHIF's panel, which cannot save).
    bob_click = _click_that_changes(site, other)
    bob_path, _ = bob.infer("phantom-abdomen-deepedit", other, {bob_click[0]: [bob_click[1]]})
    case = site.cases[other]
    token = {"authorization": f"Bearer {bob._headers['Authorization'].split()[1]}"}
    with httpx.Client(base_url=site.url, headers=token, timeout=60) as api:
        unrefined = api.post(f"/api/annotations/{site.cases[image]}/accept-refined")
        assert unrefined.status_code == 409 and "not refined" in unrefined.json()["detail"]
        accepted = api.post(f"/api/annotations/{case}/accept-refined")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["state"] == AnnotationState.CORRECTED.value
    stored = read_label_map(Path(str(site.annotation(other).correction_path)))
    assert np.array_equal(stored, read_label_map(Path(bob_path)))

    # Saving the refined label: the case's correction, with Dice and its event.
    saved = ann.save_label(image, path, tag="final")
    assert saved["image"] == image
    corrected = site.annotation(image)
    assert corrected.state == AnnotationState.CORRECTED.value
    assert corrected.corrected_by == "ann" and corrected.correction_dice is not None
    assert np.array_equal(read_label_map(Path(str(corrected.correction_path))), refined)
    with site.store.read() as session:
        kinds = session.scalars(select(OutboxEvent.event)).all()
    assert "radloop.annotation.corrected" in kinds

    # The dashboard draws both refined cases' Dice to the saved label by clicks.
    with httpx.Client(base_url=site.url, timeout=60, follow_redirects=True) as browser:
        browser.post("/login", data={"username": "mo", "password": PASSWORD})
        curves = browser.get("/dashboard/clicks.svg")
    assert curves.status_code == 200 and "median" in curves.text


def test_monailabel_client_starts_polls_and_stops_training_through_prefect(
    settings: Settings, store: Store, prefect_server: Child, review_service: Child, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    # Set-up shortcut: the retrain deployment with no worker serving it, so a requested run
    # waits; the training worker creates and serves it in the product (test_work_pools,
    # test_up).
    with get_client(sync_client=True) as prefect:
        prefect.create_deployment(prefect.create_flow_from_name("retrain-model"), "retrain")
    users = Users(store)
    users.add("ann", Role.READER, password=PASSWORD)
    users.add("rita", Role.REVIEWER, password=PASSWORD)
    site = Site(
        review_service.spec.url,
        load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml"),
        settings,
        store,
        {},
        {},
        monailabel_client(),
    )
    ml = site.ml
    ann, rita = site.client("ann", tmp_path), site.client("rita", tmp_path)
    assert not rita.train_status(check_if_running=True)
    with pytest.raises(ml.MONAILabelClientException, match="403"):
        ann.train_start("phantom-abdomen", {})
    with pytest.raises(ml.MONAILabelClientException, match="404"):
        rita.train_start("no-such-model", {})

    started = rita.train_start("phantom-abdomen", {})
    assert started["state"] == "requested"
    with get_client(sync_client=True) as prefect:
        run = prefect.read_flow_run(started["flow_run_id"])
    assert run.parameters == {"model": "phantom-abdomen", "trigger": "manual"}
    assert rita.train_status(check_if_running=True)
    status = ann.train_status()
    assert status["status"] == "RUNNING"
    assert [r["flow_run_id"] for r in status["requested"]] == [started["flow_run_id"]]

    stopped = rita.train_stop()
    assert [r["flow_run_id"] for r in stopped["stopped"]] == [started["flow_run_id"]]
    with get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(started["flow_run_id"]).state
    assert state is not None and state.is_cancelled()
    assert not rita.train_status(check_if_running=True)
