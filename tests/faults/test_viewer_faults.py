"""Orthanc (the viewer's store) killed (kill -9) while radloop stores a drafted study in it (the
images go first, the SEG last), among the images or just as it has stored the SEG, then started
again: the case waits with its reason, and the next pass stores the study and its draft, each
instance once, and offers the case to readers."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pyorthanc import Orthanc

from agents.viewer_store import ViewerStore, ViewerStoreUnavailable
from radloop.app.supervisor import Child
from radloop.db import Store
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.drafted import annotator, received_phantom
from tests.models import export_version
from tests.proxy import CuttingProxy
from tests.servers import radloop_json


def instances(url: str) -> int:
    return int(httpx.get(f"{url}/statistics", timeout=5).json()["CountInstances"])


def instances_of(url: str, study_uid: str) -> int:
    """How many instances of the study Orthanc holds."""
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
    return len(httpx.post(f"{url}/tools/find", json=query, timeout=5).json())


@ONCE  # Orthanc's own storage and radloop's retry pass: nothing database-specific
def test_orthanc_killed_mid_store_gets_the_study_and_its_draft_once_when_back(
    store: Store, settings: Settings, orthanc: Child, tmp_path: Path, radloop_env: dict[str, str]
) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=34)
    client = Orthanc(orthanc.spec.url, timeout=5)
    failures: list[BaseException] = []

    def draft() -> None:
        try:
            annotator(store, settings, client).annotate(study.study_uid, 1, spec)
        except BaseException as error:
            failures.append(error)

    drafting = threading.Thread(target=draft)
    drafting.start()
    # Some of the study is in Orthanc, not all of it: kill -9 there.
    wait_until(lambda: instances(orthanc.spec.url) >= 3, timeout=120, interval=0.02)
    orthanc.kill()
    drafting.join(120)
    assert [type(e) for e in failures] == [ViewerStoreUnavailable], failures
    (case,) = radloop_json(radloop_env, "queue", "list")
    assert case["state"] == "drafted" and not case["viewable"], case
    assert case["viewer_error"]

    orthanc.start()
    orthanc.wait_healthy()
    kept = instances(orthanc.spec.url)
    assert 3 <= kept < study.slices + 1  # what Orthanc had made durable before the kill
    viewer = ViewerStore(store, settings.spool_dir, client)
    assert viewer.publish_pending(timedelta(0)) == 1
    (case,) = radloop_json(radloop_env, "queue", "list")
    assert case["viewable"] and case["viewer_error"] is None
    # every CT slice and the SEG, once
    assert instances_of(orthanc.spec.url, study.study_uid) == study.slices + 1
    assert viewer.publish_pending(timedelta(0)) == 0


@ONCE  # Orthanc's own storage and radloop's retry pass: nothing database-specific
def test_orthanc_killed_as_it_stores_the_seg_keeps_one_seg_and_offers_the_case_when_back(
    store: Store, settings: Settings, orthanc: Child, tmp_path: Path, radloop_env: dict[str, str]
) -> None:
    """The worst moment for the SEG: Orthanc has stored it and dies before radloop hears so.
    The next pass stores the same SEG (same SOP Instance UID), not a second one."""
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    study = received_phantom(store, settings, tmp_path, seed=35)
    stores = 0

    def seg_stored(method: str, path: str, status: int) -> bool:
        nonlocal stores
        if method == "POST" and path == "/instances" and status == 200:
            stores += 1
            return stores == study.slices + 1  # the images go first, the SEG last
        return False

    proxy = CuttingProxy(orthanc.spec.url, seg_stored, then=orthanc.kill).start()
    try:
        client = Orthanc(proxy.url, timeout=5)
        with pytest.raises(ViewerStoreUnavailable):
            annotator(store, settings, client).annotate(study.study_uid, 1, spec)
        assert proxy.cuts == 1
        (case,) = radloop_json(radloop_env, "queue", "list")
        assert case["state"] == "drafted" and not case["viewable"] and case["viewer_error"]
        # Started again from this thread: a child dies with the thread that started it.
        orthanc.start()
        orthanc.wait_healthy()
        proxy.heal()
        viewer = ViewerStore(store, settings.spool_dir, client)
        assert viewer.publish_pending(timedelta(0)) == 1
    finally:
        proxy.stop()
    (case,) = radloop_json(radloop_env, "queue", "list")
    assert case["viewable"] and case["viewer_error"] is None
    # every CT slice and one SEG
    assert instances_of(orthanc.spec.url, study.study_uid) == study.slices + 1
    seg = httpx.post(f"{orthanc.spec.url}/tools/lookup", content=case["seg_sop_instance_uid"])
    assert [item["Type"] for item in seg.json()] == ["Instance"]
