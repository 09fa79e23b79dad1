"""radloop on several hosts: network namespaces this test creates, each with its own private
address and hostname, each process bound to its host's address.

gw: `radloop listen` · core: PostgreSQL (radloop, Prefect, MLflow), Prefect server, MLflow,
Orthanc · gpu1, gpu2: Triton + `radloop worker --queue annotate` each · train: `radloop worker
--queue train` · web: `radloop review serve`. Studies pushed to gw are drafted on the GPU
hosts; the worker drafting one is SIGKILLed and the other drafts it, once; the Prefect server
restarts while runs wait for a worker and nothing is lost; validated labels train a version
on `train` that then serves on both GPU hosts' Triton."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select

from agents.nifti import read_label_map
from model_registry.inference import TritonBackend
from radloop.app.phantoms import WrittenStudy, write_study
from radloop.app.supervisor import (
    Child,
    ChildSpec,
    mlflow_spec,
    orthanc_spec,
    prefect_spec,
    triton_spec,
)
from radloop.db import Annotation, AnnotationJob, Store, Study, Worker, utcnow
from radloop.domain import JobState
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings, load_settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.drafted import correction_seg, stow_body
from tests.hosts import Host, Network, network, usable, wait_listening
from tests.models import export_version
from tests.servers import RADLOOP, PostgresServer, radloop_json

pytestmark = [pytest.mark.slow, pytest.mark.skipif(usable() is not None, reason=str(usable()))]

MODEL = "phantom-abdomen"
HOSTS = ("gw", "core", "gpu1", "gpu2", "train", "web")
STORESCU = "/usr/bin/storescu"  # dcmtk's


@dataclasses.dataclass
class Cluster:
    net: Network
    root: Path
    common: dict[str, str]
    children: list[Child]
    store: Store
    settings: Settings

    def env(self, host: Host, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RADLOOP_")}
        return {
            **base,
            **self.common,
            "RADLOOP_DATA_DIR": str(self.root / host.name),
            "PREFECT_HOME": str(self.root / host.name / "prefect-client"),
            **extra,
        }

    def settings_of(self, host: Host) -> Settings:
        return load_settings(data_dir=self.root / host.name, shared_dir=self.root / "shared")

    def serve(self, host: Host, spec: ChildSpec) -> Child:
        """A server of radloop's supervisor specs, on `host`."""
        child = Child(dataclasses.replace(spec, argv=host.argv(spec.argv), ports=[]))
        child.start()
        self.children.append(child)
        child.wait_healthy()
        return child

    def radloop(self, host: Host, label: str, *args: str, **env: str) -> Any:
        log = self.root / host.name / f"{label}.log"
        return host.start(label, [RADLOOP, *args], self.env(host, **env), log)

    def cli(self, *args: str) -> Any:
        """The radloop CLI from this machine (the admin's laptop on the same network)."""
        return radloop_json(self.env(self.net["gw"]), *args)


def write_spec(folder: Path) -> None:
    """One label trains (the first goes to the holdout), briefly, and any version passes."""
    spec = yaml.safe_load((PACKAGED_MODELS / f"{MODEL}.yaml").read_text())
    spec["retraining"].update(threshold=1, epochs=1, steps_per_epoch=1, gate_margin=1.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODEL}.yaml").write_text(yaml.safe_dump(spec))


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    for key in [k for k in os.environ if k.startswith("RADLOOP_")]:
        monkeypatch.delenv(key)
    with network(HOSTS) as net:
        core = net["core"]
        # Outside tmp_path: the `postgres` account must reach it (pytest's folder is root's).
        pg_root = Path(tempfile.mkdtemp(prefix="radloop-cluster-pg-"))
        postgres = PostgresServer(
            pg_root, host=core.address, on=core.argv, network=f"{net.prefix}.0/24"
        )
        postgres.start()
        children: list[Child] = []
        try:
            database = postgres.create_database("radloop")
            postgres.create_database("prefect")
            postgres.create_database("mlflow")
            write_spec(tmp_path / "models")
            common = {
                "RADLOOP_SHARED_DIR": str(tmp_path / "shared"),
                "RADLOOP_DATABASE_URL": database,
                "RADLOOP_MODELS_DIR": str(tmp_path / "models"),
                "RADLOOP_PREFECT__API_URL": f"http://{core.address}:4200/api",
                "RADLOOP_ORTHANC__URL": f"http://{core.address}:8042",
                "RADLOOP_MLFLOW__TRACKING_URI": f"http://{core.address}:5000",
                "RADLOOP_DICOM__QUIET_SECONDS": "2",
                "RADLOOP_ANNOTATION__JOB_LEASE_SECONDS": "4",
                "RADLOOP_ANNOTATION__RETRY_DELAY_SECONDS": "0.5",
                "RADLOOP_ANNOTATION__WORKER_CONCURRENCY": "1",
                "RADLOOP_OUTBOX__POLL_SECONDS": "0.2",
                "RADLOOP_OUTBOX__MAX_BACKOFF_SECONDS": "1",
                "RADLOOP_REVIEW__SINGLE_READER": "true",
                "RADLOOP_REVIEW__HOLDOUT_FRACTION": "0.5",
                "RADLOOP_DEMO_ON_FIRST_RUN": "false",
                "TCP_NODELAY": "1",
            }
            for key, value in common.items():
                monkeypatch.setenv(key, value)
            settings = load_settings(data_dir=tmp_path / "admin")
            store = Store.open(database, migrate=True)
            yield Cluster(net, tmp_path, common, children, store, settings)
            store.close()
        finally:
            net.stop_processes()  # radloop's, while the servers they talk to still answer
            for child in reversed(children):
                child.stop()
            net.close()  # anything left, the namespaces and links
            postgres.stop()
            shutil.rmtree(pg_root, ignore_errors=True)


def push(cluster: Cluster, seed: int) -> WrittenStudy:
    study = write_study(cluster.root / "phantoms", seed, seed=seed)
    gw = cluster.net["gw"].address
    files = sorted(str(p) for p in study.dicom_dir.glob("*.dcm"))
    sent = subprocess.run(
        [STORESCU, "-aet", "PACS", "-aec", "RADLOOP", gw, "11112", *files],
        capture_output=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert sent.returncode == 0, sent.stderr
    return study


def job(store: Store, study: WrittenStudy) -> AnnotationJob | None:
    with store.read() as session:
        found = session.scalars(
            select(AnnotationJob).where(AnnotationJob.study_uid == study.study_uid)
        ).first()
        if found is not None:
            session.expunge(found)
        return found


def drafted_by(store: Store, study: WrittenStudy) -> str | None:
    """The host of the worker that drafted `study`, once it is offered to readers."""
    with store.read() as session:
        drafts = session.scalar(
            select(func.count(Annotation.id))
            .join(Study, Study.id == Annotation.study_id)
            .where(
                Study.study_uid == study.study_uid,
                Annotation.seg_sop_instance_uid.is_not(None),
                Annotation.viewable_at.is_not(None),
            )
        )
    found = job(store, study)
    if not drafts or found is None or found.state != JobState.DONE:
        return None
    assert drafts == 1, f"{drafts} drafts of {study.study_uid}"
    return str(found.worker).split(":")[0]


def workers(store: Store) -> dict[str, str]:
    """host -> queue of the workers that reported in the last 5 s."""
    since = utcnow() - timedelta(seconds=5)
    with store.read() as session:
        return {w.host: w.queue for w in session.scalars(select(Worker)) if w.last_seen_at > since}


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
    core_settings = cluster.settings_of(core)
    cluster.serve(core, orthanc_spec(core_settings, bind=core.address))
    prefect_db = cluster.common["RADLOOP_DATABASE_URL"].rsplit("/", 1)[0] + "/prefect"
    prefect = cluster.serve(
        core,
        prefect_spec(
            core_settings,
            bind=core.address,
            database_url=prefect_db.replace("+psycopg", "+asyncpg"),
        ),
    )
    mlflow_db = cluster.common["RADLOOP_DATABASE_URL"].rsplit("/", 1)[0] + "/mlflow"
    cluster.serve(core, mlflow_spec(core_settings, bind=core.address, database_url=mlflow_db))

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
    first = push(cluster, seed=1)

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
    waiting = [push(cluster, seed=2), push(cluster, seed=3)]
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
    last = push(cluster, seed=4)
    wait_until(lambda: drafted_by(store, last), timeout=120)
    with store.read() as session:
        version = session.scalar(
            select(Annotation.model_version)
            .join(Study, Study.id == Annotation.study_id)
            .where(Study.study_uid == last.study_uid)
        )
    assert version == "2"
