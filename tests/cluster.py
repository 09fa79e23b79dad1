"""radloop spread over test hosts (`tests/hosts.py`): a PostgreSQL on `core` holding radloop's,
Prefect's and MLflow's databases, radloop's settings for every host, and the servers and radloop
processes started on them. Used by `tests/test_cluster.py` and `bench/annotate_hosts.py`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from radloop.app.phantoms import WrittenStudy, write_study
from radloop.app.supervisor import Child, ChildProcess, ChildSpec, orthanc_spec, prefect_spec
from radloop.db import Annotation, AnnotationJob, Store, Study, Worker, utcnow
from radloop.domain import JobState
from radloop.settings import Settings, load_settings
from tests.hosts import Host, Network, network
from tests.models import write_retraining_spec
from tests.servers import RADLOOP, PostgresServer, radloop_json

MODEL = "phantom-abdomen"
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

    def database(self, name: str) -> str:
        """The URL of another database on the cluster's PostgreSQL (`prefect`, `mlflow`)."""
        return self.common["RADLOOP_DATABASE_URL"].rsplit("/", 1)[0] + "/" + name

    def serve(self, host: Host, spec: ChildSpec) -> Child:
        """A server of radloop's supervisor specs, on `host`."""
        child = Child(dataclasses.replace(spec, argv=host.argv(spec.argv), ports=[]))
        child.start()
        self.children.append(child)
        child.wait_healthy()
        return child

    def serve_orthanc_and_prefect(self) -> Child:
        """Orthanc and the Prefect server (on PostgreSQL) on `core`; returns Prefect's."""
        core = self.net["core"]
        settings = self.settings_of(core)
        self.serve(core, orthanc_spec(settings, bind=core.address))
        prefect_db = self.database("prefect").replace("+psycopg", "+asyncpg")
        return self.serve(core, prefect_spec(settings, bind=core.address, database_url=prefect_db))

    def radloop(self, host: Host, label: str, *args: str, **env: str) -> ChildProcess:
        log = self.root / host.name / f"{label}.log"
        return host.start(label, [RADLOOP, *args], self.env(host, **env), log)

    def cli(self, *args: str) -> Any:
        """The radloop CLI from this machine (the admin's laptop on the same network)."""
        return radloop_json(self.env(self.net["gw"]), *args)

    def push(self, seed: int) -> WrittenStudy:
        """A phantom CT study sent by the PACS to the listener on `gw` with dcmtk's storescu."""
        return self.send([self.phantom(seed)])[0]

    def phantom(self, seed: int) -> WrittenStudy:
        return write_study(self.root / "phantoms", seed, seed=seed)

    def send(self, studies: Sequence[WrittenStudy]) -> list[WrittenStudy]:
        gw = self.net["gw"].address
        for study in studies:
            files = sorted(str(p) for p in study.dicom_dir.glob("*.dcm"))
            sent = subprocess.run(
                [STORESCU, "-aet", "PACS", "-aec", "RADLOOP", gw, "11112", *files],
                capture_output=True,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            assert sent.returncode == 0, sent.stderr
        return list(studies)


@contextmanager
def cluster_on(
    root: Path,
    hosts: Sequence[str],
    setenv: Callable[[str, str], None] = os.environ.__setitem__,
    **settings: str,
) -> Iterator[Cluster]:
    """Test hosts `hosts` (one named `core`) with PostgreSQL on `core` and radloop's settings
    for all of them (`settings`: more RADLOOP_* values); `setenv` applies them to this process
    too. On exit: radloop's processes, then the servers, then the namespaces, by pid and name."""
    with network(hosts) as net:
        core = net["core"]
        # Outside `root`: the `postgres` account must reach it (pytest's folders are root's).
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
            # One label trains (the first goes to the holdout), briefly, and any version passes.
            write_retraining_spec(
                root / "models", threshold=1, epochs=1, steps_per_epoch=1, gate_margin=1.0
            )
            common = {
                "RADLOOP_SHARED_DIR": str(root / "shared"),
                "RADLOOP_DATABASE_URL": database,
                "RADLOOP_MODELS_DIR": str(root / "models"),
                "RADLOOP_PREFECT__API_URL": f"http://{core.address}:4200/api",
                "RADLOOP_ORTHANC__URL": f"http://{core.address}:8042",
                "RADLOOP_MLFLOW__TRACKING_URI": f"http://{core.address}:5000",
                "RADLOOP_DICOM__QUIET_SECONDS": "2",
                "RADLOOP_OUTBOX__POLL_SECONDS": "0.2",
                "RADLOOP_OUTBOX__MAX_BACKOFF_SECONDS": "1",
                "RADLOOP_DEMO_ON_FIRST_RUN": "false",
                "TCP_NODELAY": "1",
                **settings,
            }
            for key, value in common.items():
                setenv(key, value)
            admin = load_settings(data_dir=root / "admin")
            store = Store.open(database, migrate=True)
            try:
                yield Cluster(net, root, common, children, store, admin)
            finally:
                store.close()
        finally:
            net.stop_processes()  # radloop's, while the servers they talk to still answer
            for child in reversed(children):
                child.stop()
            net.close()  # anything left, the namespaces and links
            postgres.stop()
            shutil.rmtree(pg_root, ignore_errors=True)


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
