"""Ingest under load (issue 14, item 3): 8 associations pushing for 5 minutes while studies are
drafted and a model retrains — nothing lost, every study completes — and Orthanc taking the
same pushes in the same run, as the peer.

Set-up: a fresh data dir on free ports (SQLite, as `radloop up` runs by default); an untrained
version of the packaged phantom-abdomen model, its retraining made long (`--epochs`) so that
it lasts the run; three phantom studies received, drafted and corrected by a single reader
with the tests' helpers (`tests/drafted.py`, the product's ingest, annotator and worklist in
this process), so that there are labels to train on. Then `radloop up` (every part real), and
`radloop train phantom-abdomen` as an ML engineer would start it.

The pushers: `--associations` threads, each running dcmtk's `storescu` once per study, back to
back, on a phantom CT series (48–64 slices of 128×128) given new study, series and instance
UIDs for each push. For `--seconds`, against radloop's listener; then for as long, against an
Orthanc of its own (the config `radloop up` runs its own with, on another folder) while
radloop's training and drafting go on beside it, so both receivers meet the same load.

Checked for radloop: every instance storescu sent (it exited 0: each one answered Success) is
in the index once, in its study; every study completes (its quiet period, `dicom.quiet_seconds`)
with one `study.completed` event, and gets one annotation job — the durable record behind its
draft, planned as the outbox dispatcher sends the event, so the check waits for the
dispatcher to catch up and says how long that took; the training run is still running or
decided, never failed. For Orthanc: it holds every instance sent.

    python bench/ingest_load.py --seconds 300 --json-out bench/results/ingest-load.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
from annotate import (
    MODEL,
    RADLOOP,
    STORESCU,
    configure,
    free_port,
    healthy,
    machine,
    radloop_up,
    wait_for,
)
from pydicom.uid import generate_uid
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from radloop.app.phantoms import write_study
from radloop.app.supervisor import Child, orthanc_spec
from radloop.db import AnnotationJob, Instance, OutboxEvent, Store, Study, TrainingRun
from radloop.domain import StudyState, TrainingState
from radloop.events import EventType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.models import export_version, write_retraining_spec
from tests.test_retrain import validate_studies


class Pusher:
    """One association at a time, back to back: a new copy of `template`'s series for each."""

    def __init__(self, template: Path, folder: Path) -> None:
        self.datasets = [pydicom.dcmread(path) for path in sorted(template.glob("*.dcm"))]
        self.folder = folder
        self.pushed: dict[str, int] = {}  # study UID -> instances acknowledged
        self.refused: list[str] = []  # storescu's last words, for a push that failed

    def copy(self) -> tuple[str, list[str]]:
        study, series = generate_uid(), generate_uid()
        paths = []
        for number, dataset in enumerate(self.datasets):
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            path = self.folder / f"{number:04d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(str(path))
        return study, paths

    def push_until(self, target: list[str], deadline: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pushed, self.refused = {}, []
        while time.monotonic() < deadline:
            study, paths = self.copy()
            done = subprocess.run([*target, *paths], capture_output=True, text=True)
            if done.returncode == 0:  # storescu exits 0 only when every instance got Success
                self.pushed[study] = len(paths)
            else:
                self.refused.append((done.stdout + done.stderr).strip()[-300:])


def push(
    pushers: list[Pusher], target: list[str], seconds: float
) -> tuple[dict[str, int], list[str], float]:
    """Every pusher against `target` for `seconds`, at once; returns the studies acknowledged
    (UID -> instances), the failed pushes and the seconds it took (the last push ends after
    the deadline)."""
    started = time.monotonic()
    threads = [
        threading.Thread(target=p.push_until, args=(target, started + seconds)) for p in pushers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pushed = {uid: n for p in pushers for uid, n in p.pushed.items()}
    refused = [line for p in pushers for line in p.refused]
    return pushed, refused, time.monotonic() - started


def radloop_check(store: Store, pushed: dict[str, int]) -> dict[str, Any] | None:
    """Once every pushed study has completed: what the index holds for them; else None."""
    with store.read() as session:
        states = dict(
            session.execute(
                select(Study.study_uid, Study.state).where(Study.study_uid.in_(pushed))
            ).all()
        )
        if len(states) < len(pushed) or StudyState.RECEIVING.value in states.values():
            return None
        indexed = dict(
            session.execute(
                select(Study.study_uid, func.count(Instance.id))
                .join(Instance, Instance.study_id == Study.id)
                .where(Study.study_uid.in_(pushed))
                .group_by(Study.study_uid)
            ).all()
        )
        jobs = dict(
            session.execute(
                select(AnnotationJob.study_uid, func.count(AnnotationJob.id))
                .where(AnnotationJob.study_uid.in_(pushed))
                .group_by(AnnotationJob.study_uid)
            ).all()
        )
        completed_events = dict(
            session.execute(
                select(OutboxEvent.resource_id, func.count(OutboxEvent.id))
                .where(
                    OutboxEvent.event == EventType.STUDY_COMPLETED.value,
                    OutboxEvent.resource_id.in_([f"radloop.study.{uid}" for uid in pushed]),
                )
                .group_by(OutboxEvent.resource_id)
            ).all()
        )
        if len(jobs) < len(pushed):  # the dispatcher plans a study's job as it sends its event
            return None
        drafted = session.scalar(
            select(func.count(AnnotationJob.id)).where(
                AnnotationJob.study_uid.in_(pushed), AnnotationJob.annotation_id.is_not(None)
            )
        )
    return {
        "studies": len(pushed),
        "instances_acknowledged": sum(pushed.values()),
        "instances_indexed": sum(indexed.values()),
        "studies_short": sorted(uid for uid, n in pushed.items() if indexed.get(uid) != n),
        "studies_failed": sorted(
            uid for uid, state in states.items() if state == StudyState.FAILED.value
        ),
        "studies_without_one_job": sorted(uid for uid in pushed if jobs.get(uid) != 1),
        "studies_without_one_completed_event": sorted(
            uid for uid in pushed if completed_events.get(f"radloop.study.{uid}") != 1
        ),
        "drafted_at_check": int(drafted or 0),
    }


def training_state(store: Store) -> dict[str, Any]:
    with store.read() as session:
        row = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())).first()
        if row is None:
            return {"state": None}
        return {"id": row.id, "state": row.state, "epoch": row.epoch, "epochs": row.epochs}


def orthanc_instances(url: str) -> int:
    return int(httpx.get(f"{url}/statistics", timeout=30).json()["CountInstances"])


def measure(seconds: float, associations: int, epochs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-load-") as tmp:
        work = Path(tmp)
        models = work / "models"
        settings, env = configure(work / "data", {"RADLOOP_MODELS_DIR": str(models)})
        os.environ["RADLOOP_MODELS_DIR"] = str(models)
        settings = settings.model_copy(update={"models_dir": models})
        spec = write_retraining_spec(models, threshold=1000, epochs=epochs, steps_per_epoch=8)
        export_version(settings, spec)
        store = Store.open(settings.effective_database_url)
        try:
            # Labels to train on: received, drafted and corrected as tests/drafted.py does.
            validate_studies(settings, store, spec, work / "labels", [41, 42, 43], lambda _, t: t)
            pushers = [
                Pusher(write_study(work / "templates", i, seed=500 + i).dicom_dir, work / f"p{i}")
                for i in range(associations)
            ]
            before = machine()
            with radloop_up(env, work / "data" / "radloop-up.log") as up:
                wait_for("every service healthy", lambda: healthy(env, up), timeout=300, interval=2)
                subprocess.run([RADLOOP, "train", MODEL], env=env, check=True, capture_output=True)
                wait_for(
                    "the training running",
                    lambda: training_state(store)["state"] == TrainingState.RUNNING.value,
                    timeout=120,
                )
                scu = [STORESCU, "-aec", settings.dicom.ae_title, "127.0.0.1"]
                radloop_pushed, radloop_refused, radloop_s = push(
                    pushers, [*scu, str(settings.dicom.port)], seconds
                )
                during = training_state(store)
                pushed_at = time.monotonic()
                checked = wait_for(
                    "every pushed study completed, its job planned",
                    lambda: radloop_check(store, radloop_pushed),
                    timeout=900,
                    interval=2,
                )
                checked["planned_after_push_s"] = round(time.monotonic() - pushed_at, 1)
                # The peer, with radloop's training and drafting still going on beside it.
                ports = {"http_port": free_port(), "dicom_port": free_port()}
                peer_settings = settings.model_copy(
                    update={
                        "data_dir": work / "peer",
                        "orthanc": settings.orthanc.model_copy(update=ports),
                    }
                )
                orthanc = Child(orthanc_spec(peer_settings))
                orthanc.start()
                try:
                    orthanc.wait_healthy()
                    peer_scu = [STORESCU, "-aec", settings.orthanc.ae_title, "127.0.0.1"]
                    peer_port = str(peer_settings.orthanc.dicom_port)
                    orthanc_pushed, orthanc_refused, orthanc_s = push(
                        pushers, [*peer_scu, peer_port], seconds
                    )
                    orthanc_held = orthanc_instances(orthanc.spec.url)
                finally:
                    orthanc.stop()
                after = training_state(store)
        finally:
            store.close()
    radloop_rate = checked["instances_acknowledged"] / radloop_s
    orthanc_sent = sum(orthanc_pushed.values())
    orthanc_rate = orthanc_sent / orthanc_s
    return {
        "machine": before | {"load_after": round(os.getloadavg()[0], 2)},
        "associations": associations,
        "seconds": seconds,
        "radloop": checked
        | {
            "wall_s": round(radloop_s, 1),
            "pushes_failed": radloop_refused,
            "instances_per_s": round(radloop_rate, 1),
            "training_at_end_of_push": during,
            "training_at_end": after,
        },
        "orthanc": {
            "studies": len(orthanc_pushed),
            "instances_acknowledged": orthanc_sent,
            "instances_held": orthanc_held,
            "wall_s": round(orthanc_s, 1),
            "pushes_failed": orthanc_refused,
            "instances_per_s": round(orthanc_rate, 1),
        },
        "radloop_over_orthanc": round(radloop_rate / orthanc_rate, 3),
        "nothing_lost": (
            checked["instances_indexed"] == checked["instances_acknowledged"]
            and not checked["studies_short"]
            and not checked["studies_failed"]
            and not checked["studies_without_one_job"]
            and not checked["studies_without_one_completed_event"]
            and not radloop_refused
            and after["state"] != TrainingState.FAILED.value
        ),
    }


def table(report: dict[str, Any]) -> Table:
    out = Table(
        title=f"{report['associations']} associations for {report['seconds']:g} s, "
        "training and drafting beside them"
    )
    for column in ("receiver", "studies", "instances", "instances/s", "failed pushes"):
        out.add_column(column, justify="right" if column != "receiver" else "left")
    for name in ("radloop", "orthanc"):
        cell = report[name]
        out.add_row(
            name,
            str(cell["studies"]),
            str(cell["instances_acknowledged"]),
            f"{cell['instances_per_s']:.1f}",
            str(len(cell["pushes_failed"])),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=400, help="of the training run (8 steps)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    report = measure(args.seconds, args.associations, args.epochs)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    console = Console()
    console.print(table(report))
    radloop = report["radloop"]
    console.print(
        f"radloop ÷ Orthanc: {report['radloop_over_orthanc']}; indexed "
        f"{radloop['instances_indexed']} of {radloop['instances_acknowledged']} acknowledged; "
        f"drafted by the check: {radloop['drafted_at_check']} of {radloop['studies']}; "
        f"training: {radloop['training_at_end']}; nothing lost: {report['nothing_lost']}"
    )
    if not report["nothing_lost"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
