"""radloop on several hosts: network namespaces this test creates, each with its own private
address and hostname, each process bound to its host's address.

gw: `radloop listen` · core: PostgreSQL (radloop, Prefect, MLflow), Prefect server, MLflow,
Orthanc · gpu1, gpu2: Triton + `radloop worker --queue annotate` each · train: `radloop worker
--queue train` · web: `radloop review serve`. Studies pushed to gw are drafted on the GPU
hosts; the worker drafting one is SIGKILLed and the other drafts it, once; the Prefect server
restarts while runs wait for a worker and nothing is lost; validated labels train a version
on `train` that then serves on both GPU hosts' Triton."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from agents.nifti import read_label_map
from model_registry.inference import TritonBackend
from radloop.app.supervisor import mlflow_spec, triton_spec
from radloop.db import Annotation, AnnotationJob, Study
from radloop.domain import JobState
from radloop.modelspec import load_spec
from radloop.wait import wait_until
from tests.cluster import MODEL, Cluster, cluster_on, drafted_by, job, workers
from tests.conftest_marks import ONCE, STACK
from tests.drafted import correction_seg, stow_body
from tests.hosts import usable, wait_listening
from tests.models import export_version
from tests.servers import radloop_json

pytestmark = [
    pytest.mark.slow,
    STACK,
    pytest.mark.skipif(usable() is not None, reason=str(usable())),
]

HOSTS = ("gw", "core", "gpu1", "gpu2", "train", "web")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    for key in [k for k in os.environ if k.startswith("RADLOOP_")]:
        monkeypatch.delenv(key)
    with cluster_on(
        tmp_path,
        HOSTS,
        monkeypatch.setenv,
        RADLOOP_ANNOTATION__JOB_LEASE_SECONDS="4",
        RADLOOP_ANNOTATION__RETRY_DELAY_SECONDS="0.5",
        RADLOOP_ANNOTATION__WORKER_CONCURRENCY="1",
        RADLOOP_REVIEW__SINGLE_READER="true",
        RADLOOP_REVIEW__HOLDOUT_FRACTION="0.5",
    ) as made:
        yield made


@pytest.mark.timeout(900)
@ONCE  # its database is its own PostgreSQL (the cluster shape) in either pass
def test_a_cluster_of_namespaces_drafts_hands_over_survives_prefect_and_trains_for_both_gpus(
    cluster: Cluster,
) -> None:
    net, store = cluster.net, cluster.store
    core, gw, web, train = net["core"], net["gw"], net["web"], net["train"]
    gpus = {name: net[name] for name in ("gpu1", "gpu2")}
    spec = load_spec(cluster.root / "models" / f"{MODEL}.yaml")

    # core: Orthanc, Prefect and MLflow (on PostgreSQL), each bound to core's address.
    prefect = cluster.serve_orthanc_and_prefect()
    mlflow = mlflow_spec(
        cluster.settings_of(core), bind=core.address, database_url=cluster.database("mlflow")
    )
    cluster.serve(core, mlflow)

    # A first version in the shared model repository; a Triton on each GPU host.
    export_version(cluster.settings_of(gw), spec)
    for gpu in gpus.values():
        cluster.serve(gpu, triton_spec(cluster.settings_of(gpu), bind=gpu.address))

    # gw: the listener; train: the training worker (it deploys through gpu1's Triton); web.
    cluster.radloop(
        gw,
        "listen",
        "listen",
        RADLOOP_DICOM__HOST=gw.address,
        RADLOOP_DICOM__ALLOWED_CALLERS=f"PACS@{net.gateway}",
    )
    wait_listening(gw.address, 11112)
    triton_of = {name: f"http://{gpu.address}:8000" for name, gpu in gpus.items()}
    cluster.radloop(
        train, "trainer", "worker", "--queue", "train", RADLOOP_TRITON__URL=triton_of["gpu1"]
    )
    cluster.radloop(web, "review", "review", "serve", RADLOOP_REVIEW__HOST=web.address)
    annotators = {
        name: cluster.radloop(
            gpu, "worker", "worker", "--queue", "annotate", RADLOOP_TRITON__URL=triton_of[name]
        )
        for name, gpu in gpus.items()
    }
    expected = {"gpu1": "annotate", "gpu2": "annotate", "train": "train"}
    wait_until(lambda: workers(store) == expected, timeout=180, interval=1, what="3 workers")
    wait_listening(web.address, 8080)
    status = radloop_json(cluster.env(gw), "status", exit_codes=(0, 1))
    listed = {(w["host"], w["queue"]) for w in status["workers"]}
    assert listed == {("gpu1", "annotate"), ("gpu2", "annotate"), ("train", "train")}

    # 1. A study is taken by a worker, which is SIGKILLed in the middle of it: the other GPU
    # host drafts it, exactly once.
    first = cluster.push(seed=1)

    def running() -> AnnotationJob | None:
        found = job(store, first)
        return found if found is not None and found.state == JobState.RUNNING else None

    taken = wait_until(running, timeout=120, interval=0.05, what="the first study taken")
    victim = str(taken.worker).split(":")[0]
    survivor = next(name for name in gpus if name != victim)
    annotators[victim].kill()
    assert wait_until(lambda: drafted_by(store, first), timeout=120) == survivor
    done = job(store, first)
    assert done is not None and done.attempts >= 2
    # Prefect's UI shows the run the killed worker had taken as Crashed, not running forever.
    api = cluster.common["RADLOOP_PREFECT__API_URL"]
    crashed = httpx.get(f"{api}/task_runs/{taken.task_run_id}").json()["state"]
    assert crashed["type"] == "CRASHED", crashed
    # What `radloop queue list --json` says of its timing.
    (row,) = [r for r in cluster.cli("queue", "list") if r["study_uid"] == first.study_uid]
    assert row["completed_at"] < row["drafted_at"]
    assert set(row["timings"]) >= {"load_s", "infer_s", "write_s", "store_s"}

    # 2. No worker connected: two studies' runs wait in Prefect, which restarts. A worker that
    # connects afterwards, on the other GPU host, still drafts both.
    annotators[survivor].stop()
    waiting = [cluster.push(seed=2), cluster.push(seed=3)]
    wait_until(lambda: all(getattr(job(store, s), "task_run_id", None) for s in waiting), 60)
    prefect.stop()
    prefect.start()
    prefect.wait_healthy()
    annotators[victim] = cluster.radloop(
        gpus[victim],
        "worker-again",
        "worker",
        "--queue",
        "annotate",
        RADLOOP_TRITON__URL=triton_of[victim],
    )
    for study in waiting:
        assert wait_until(partial(drafted_by, store, study), timeout=180) == victim

    # 3. Corrections saved through the review service on web validate two labels (the first
    # goes to the holdout); the training on `train` promotes version 2, and both GPU hosts'
    # Tritons serve it.
    annotators[survivor] = cluster.radloop(
        gpus[survivor],
        "worker-3",
        "worker",
        "--queue",
        "annotate",
        RADLOOP_TRITON__URL=triton_of[survivor],
    )
    reader = cluster.cli("users", "add", "ann", "--role", "reader")
    for study in (first, waiting[0]):
        case = next(
            row for row in cluster.cli("queue", "list") if row["study_uid"] == study.study_uid
        )
        cluster.cli("queue", "claim", str(case["annotation_id"]), "--user", "ann")
        labels = read_label_map(study.truth)
        seg = correction_seg(store, cluster.settings, spec, study, labels, cluster.root / "segs")
        body, content_type = stow_body(seg)
        saved = httpx.post(
            f"http://{web.address}:8080/dicom-web/studies",
            content=body,
            headers={"content-type": content_type, "authorization": f"Bearer {reader['token']}"},
            timeout=60,
        )
        assert saved.status_code == 200, saved.text
    for name in gpus:
        serves = partial(TritonBackend(triton_of[name]).ready, MODEL, "2")
        wait_until(serves, timeout=300, interval=1, what=f"v2 on {name}")
    # The next study is drafted with it.
    last = cluster.push(seed=4)
    wait_until(lambda: drafted_by(store, last), timeout=120)
    with store.read() as session:
        version = session.scalar(
            select(Annotation.model_version)
            .join(Study, Study.id == Annotation.study_id)
            .where(Study.study_uid == last.study_uid)
        )
    assert version == "2"
