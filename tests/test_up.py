"""`radloop up` as a user runs it: every part started, healthy, fed, the loop turned once with no
patient data left outside the DICOM files, and stopped by Ctrl-C."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from agents.nifti import read_label_map
from radloop.app.phantoms import WrittenStudy, write_study
from radloop.db import Store
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest import bucket
from tests.conftest_marks import ONCE, STACK
from tests.dicom_files import generated_ct
from tests.drafted import correction_seg, stow_body
from tests.models import export_version, write_retraining_spec
from tests.patient_data import (
    carry_patient_data,
    hits_in,
    hits_in_bucket,
    hits_in_database,
    hits_in_files,
    unprivileged_views,
)
from tests.servers import RadloopProcess, S3Server, radloop_json
from tests.test_scp import storescu

# Each test runs the whole `radloop up`.
pytestmark = [pytest.mark.slow, STACK]


def study_state(env: dict[str, str], study_uid: str) -> str | None:
    for study in radloop_json(env, "studies", "list"):
        if study["study_uid"] == study_uid:
            return str(study["state"])
    return None


def study_has_state(env: dict[str, str], study_uid: str, state: str) -> bool:
    return study_state(env, study_uid) == state


# The services `radloop up` runs do their work on PostgreSQL in test_cluster (its own server):
# this one, about 4 min, runs in the SQLite pass only. Its shared files are on S3 (the bucket
# `object_store` gives it): Triton serves from there, the worker reads the task parameters the
# dispatcher put there, the validated pairs and MLflow's artifacts land there.
#
# Every study it pushes carries a sentinel patient (name, ID, birth date), accession number and
# institution; once the loop has turned — drafted, corrected, validated, trained, deployed —
# and radloop has stopped, no sentinel is anywhere but in the DICOM files and Orthanc.
@ONCE
@pytest.mark.timeout(900)
@pytest.mark.object_store
def test_up_turns_the_loop_on_studies_from_each_source_leaks_no_patient_data_and_stops(
    radloop_env: dict[str, str],
    settings: Settings,
    tmp_path: Path,
    s3_server: S3Server,
    request: pytest.FixtureRequest,
) -> None:
    # Retraining after one new train label, short; the gate (test_retrain's subject) lets
    # through whatever it scores, so that the loop reaches deployment here.
    models = tmp_path / "models"
    spec = write_retraining_spec(models, threshold=1, epochs=1, steps_per_epoch=2, gate_margin=1.0)
    env = {
        **radloop_env,
        "RADLOOP_MODELS_DIR": str(models),
        # The first validated study goes to the holdout, the second to training.
        "RADLOOP_REVIEW__HOLDOUT_FRACTION": "0.5",
    }
    settings = settings.model_copy(update={"models_dir": models})
    export_version(settings, spec)
    up = RadloopProcess(env, command=("up",)).start(timeout=240)
    views: dict[str, bytes] = {}
    try:
        status = radloop_json(env, "status")
        services = {s["name"]: s for s in status["services"]}
        assert set(services) >= {"dicom", "database", "orthanc", "prefect", "triton", "review"}
        assert all(s["healthy"] for s in services.values()), services

        pushed = generated_ct(tmp_path / "push", 4, seed=1)
        uploaded = generated_ct(tmp_path / "orthanc", 3, seed=2)
        dropped = generated_ct(tmp_path / "drop", 2, seed=3)
        carry_patient_data([*pushed, *uploaded, *dropped])
        assert storescu(env, pushed).returncode == 0
        orthanc_url = services["orthanc"]["url"]
        for path in uploaded:
            httpx.post(f"{orthanc_url}/instances", content=path.read_bytes()).raise_for_status()
        shutil.copytree(dropped[0].parent, Path(env["RADLOOP_DATA_DIR"]) / "incoming" / "x")

        for files in (pushed, uploaded, dropped):
            uid = str(dcmread(files[0]).StudyInstanceUID)
            wait_until(partial(study_state, env, uid), timeout=60)
            wait_until(partial(study_has_state, env, uid, "complete"), timeout=60)

        # A phantom CT pushed with storescu is drafted by the served model, no human step.
        phantom = phantom_study(tmp_path, 0, seed=5)
        assert storescu(env, sorted(phantom.dicom_dir.glob("*.dcm"))).returncode == 0
        draft = wait_until(partial(drafted, env, phantom), timeout=240, interval=2)
        assert draft["model_version"] == "1" and draft["seg_sop_instance_uid"]
        found = httpx.post(
            f"{orthanc_url}/tools/lookup", content=str(draft["seg_sop_instance_uid"])
        )
        assert [item["Type"] for item in found.json()] == ["Instance"]

        # A reader claims it, saves a correction through the review service's DICOMweb proxy
        # (as OHIF does), a reviewer validates it: it leaves the queue as a holdout label.
        reader = radloop_json(env, "users", "add", "ann", "--role", "reader")
        radloop_json(env, "users", "add", "rita", "--role", "reviewer")
        case = int(str(draft["annotation_id"]))
        claimed = radloop_json(env, "queue", "claim", str(case), "--user", "ann")
        assert claimed["state"] == "claimed"
        store = Store.open(settings.effective_database_url)
        seg = correction_seg(
            store, settings, spec, phantom, read_label_map(phantom.truth), tmp_path
        )
        store.close()
        body, content_type = stow_body(seg)
        review_url = services["review"]["url"]
        as_reader = {"authorization": f"Bearer {reader['token']}"}
        saved = httpx.post(
            f"{review_url}/dicom-web/studies",
            content=body,
            headers={"content-type": content_type, **as_reader},
            timeout=60,
        )
        assert saved.status_code == 200, saved.text
        validated = radloop_json(env, "queue", "validate", str(case), "--user", "rita")
        assert validated["state"] == "validated" and validated["correction_dice"] < 1.0
        assert case not in [row["annotation_id"] for row in radloop_json(env, "queue", "list")]

        # A second study, corrected with a NIfTI upload (as 3D Slicer saves one) and validated:
        # the first train label. It triggers retraining; the challenger is registered in
        # MLflow, promoted and hot-reloaded, and Triton serves it.
        second = phantom_study(tmp_path, 1, seed=6)
        assert storescu(env, sorted(second.dicom_dir.glob("*.dcm"))).returncode == 0
        other = int(str(wait_until(partial(drafted, env, second), 240, 2)["annotation_id"]))
        for step, content in (("claim", None), ("label", second.truth.read_bytes())):
            method = "PUT" if content else "POST"
            url = f"{review_url}/api/annotations/{other}/{step}"
            answer = httpx.request(method, url, content=content, headers=as_reader, timeout=60)
            assert answer.status_code == 200, answer.text
        radloop_json(env, "queue", "validate", str(other), "--user", "rita")
        # Every 5 s: `models list` imports MLflow's client, 3 s of CPU the training needs.
        wait_until(partial(served, env, spec.name, 2), timeout=300, interval=5)

        views["anonymous"] = unprivileged_views(review_url, None, [case, other])
        views["reader"] = unprivileged_views(review_url, reader["token"], [case, other])

        name = bucket(request.node)
        assert f"radloop/model-repository/{spec.name}/2/model.py" in s3_server.keys(name)
        assert s3_server.keys(name, "radloop/prefect-results/")  # the task's parameters
        assert len(s3_server.keys(name, f"radloop/datasets/{spec.name}/")) == 4
        data_dir = Path(env["RADLOOP_DATA_DIR"])
        assert not {"model-repository", "prefect-results", "datasets"} & {
            p.name for p in data_dir.iterdir()
        }
    finally:
        code = up.stop(sig=signal.SIGINT, timeout=60)
    assert code == 0, up.output()
    for url in (orthanc_url + "/system", services["prefect"]["url"] + "/api/health"):
        try:
            httpx.get(url, timeout=2)
            raise AssertionError(f"{url} still answers after radloop up stopped")
        except httpx.ConnectError:
            pass

    # Stopped, every log is flushed and every database closed. Searched: the data dir (radloop's
    # database and logs, Prefect's database and its workers' storage, MLflow's database, Triton's
    # log, the spool's and watch folder's leftovers), radloop's database column by column, the
    # bucket (task parameters and results, MLflow's artifacts, model versions, the validated
    # NIfTI pairs) and what readers and anonymous callers were shown. Not searched: DICOM files
    # and Orthanc's folder, which stores them and indexes their tags.
    assert b"== GET /api/worklist 200" in views["reader"]
    # They went in, and the search finds them where they belong.
    assert {hit.needle for hit in hits_in_files(data_dir / "orthanc" / "index")} >= {
        "zqxfamily",
        "zqxpid4711",
        "19230417",
        "zqxacc0815",
        "zqx institute",
    }
    hits = [
        *hits_in_files(data_dir, skip=[data_dir / "orthanc"]),
        *hits_in_database(settings.effective_database_url),
        *hits_in_bucket(s3_server.client(), name),
        *(hit for who, blob in views.items() for hit in hits_in(f"shown to {who}", blob)),
    ]
    assert not hits, "patient data outside the DICOM files:\n" + "\n".join(map(str, hits))


def phantom_study(tmp_path: Path, index: int, seed: int) -> WrittenStudy:
    study = write_study(tmp_path / "phantoms", index, seed=seed)
    carry_patient_data(study.dicom_dir.glob("*.dcm"))
    return study


def drafted(env: dict[str, str], study: WrittenStudy) -> dict[str, object] | None:
    for row in radloop_json(env, "queue", "list"):
        # Offered to readers once its images and draft are in the viewer's Orthanc.
        if row["study_uid"] == study.study_uid and row["state"] == "drafted":
            return dict(row) if row["viewable"] else None
    return None


def served(env: dict[str, str], model: str, version: int) -> bool:
    rows = radloop_json(env, "models", "list")
    return any(r["name"] == model and r["version"] == version and r["served"] for r in rows)


@pytest.mark.timeout(900)
@ONCE  # Triton outages, task retries and start-up choices: nothing database-specific
def test_a_refused_demo_leaves_radloop_up_and_a_study_outlives_triton_killed_under_it(
    radloop_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    env = {
        **radloop_env,
        # A site's allow-list: its PACS, dcmtk's storescu and echoscu, radloop's status probe.
        "RADLOOP_DICOM__ALLOWED_CALLERS": (
            "PACS@10.1.2.3,STORESCU@127.0.0.1,ECHOSCU@127.0.0.1,RADLOOP-STATUS"
        ),
        "COLUMNS": "200",  # rich wraps its messages at the terminal's width
        "RADLOOP_SUPERVISOR__RESTART_BACKOFF_SECONDS": "1",  # Triton back sooner below
        # Shorter than the later retry delays below: the worker must hold the job meanwhile.
        "RADLOOP_ANNOTATION__JOB_LEASE_SECONDS": "6",
    }
    # Asked for anyway, the demo's own association is refused: the demo fails, radloop stays
    # up. (That a site with an allow-list gets no demo unasked: `test_settings.py`.)
    up = RadloopProcess(env, command=("up", "--demo")).start(timeout=240)
    try:
        wait_until(lambda: "the demo failed; radloop keeps running" in up.output(), 120)
        assert "refused the demo's association" in up.output()
        assert all(s["healthy"] for s in radloop_json(env, "status")["services"])

        phantom = write_study(tmp_path / "phantoms", 0, seed=6)
        assert storescu(env, sorted(phantom.dicom_dir.glob("*.dcm"))).returncode == 0
        # The study completes 2 s later and its worker takes it a moment after. Triton is
        # killed as soon as radloop up restarts it, for long enough that the task's first
        # attempt finds no Triton; then it is left to come back. Only the server is killed, as a
        # crash would: not the guard radloop up runs it under (whose command line names it too),
        # which then ends the server's python-backend stubs.
        kills = 0
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            pattern = rf"^\S*/tritonserver\s.*{settings.model_repository}"
            kills += subprocess.run(["pkill", "-KILL", "-f", pattern]).returncode == 0
            time.sleep(0.5)
        assert kills >= 2

        def drafts() -> list[dict[str, object]]:
            rows = radloop_json(env, "queue", "list", "--all")
            return [r for r in rows if r["study_uid"] == phantom.study_uid]

        (draft,) = wait_until(drafts, timeout=300, interval=2)
        assert draft["state"] == "drafted", draft
        time.sleep(5)  # a duplicate would show up here
        assert len(drafts()) == 1
        up_log = (Path(settings.data_dir) / "radloop-up.log").read_text()
        assert "triton exited" in up_log
        assert "submitting it again" not in up_log  # one task run, its retries on one worker
        worker_log = (Path(settings.data_dir) / "logs" / "worker.log").read_text()
        assert "Retry 1/8" in worker_log  # the task failed while Triton was down, then retried
    finally:
        assert up.stop(sig=signal.SIGINT, timeout=60) == 0, up.output()
