"""`radloop up` as a user runs it: every part started, healthy, fed, and stopped by Ctrl-C."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import httpx
from pydicom import dcmread

from tests.dicom_files import generated_ct
from tests.servers import RadloopProcess, radloop_json, wait_until
from tests.test_scp import storescu


def study_state(env: dict[str, str], study_uid: str) -> str | None:
    for study in radloop_json(env, "studies", "list"):
        if study["study_uid"] == study_uid:
            return str(study["state"])
    return None


def test_up_starts_every_part_ingests_from_each_source_and_stops_on_ctrl_c(
    radloop_env: dict[str, str], tmp_path: Path
) -> None:
    up = RadloopProcess(radloop_env, command=("up",)).start(timeout=180)
    try:
        status = radloop_json(radloop_env, "status")
        services = {s["name"]: s for s in status["services"]}
        assert set(services) >= {"dicom", "database", "orthanc", "prefect", "triton"}
        assert all(s["healthy"] for s in services.values()), services

        pushed = generated_ct(tmp_path / "push", 4, seed=1)
        assert storescu(radloop_env, pushed).returncode == 0
        orthanc_url = services["orthanc"]["url"]
        uploaded = generated_ct(tmp_path / "orthanc", 3, seed=2)
        for path in uploaded:
            httpx.post(f"{orthanc_url}/instances", content=path.read_bytes()).raise_for_status()
        dropped = generated_ct(tmp_path / "drop", 2, seed=3)
        shutil.copytree(dropped[0].parent, Path(radloop_env["RADLOOP_DATA_DIR"]) / "incoming" / "x")

        for files in (pushed, uploaded, dropped):
            uid = str(dcmread(files[0]).StudyInstanceUID)
            wait_until(lambda uid=uid: study_state(radloop_env, uid) == "complete", timeout=60)
    finally:
        code = up.stop(sig=signal.SIGINT, timeout=60)
    assert code == 0, up.output()
    for url in (orthanc_url + "/system", services["prefect"]["url"] + "/api/health"):
        try:
            httpx.get(url, timeout=2)
            raise AssertionError(f"{url} still answers after radloop up stopped")
        except httpx.ConnectError:
            pass
