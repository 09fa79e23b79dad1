"""Annotation benchmark (issues 3, 11): from a completed study to a draft in the review queue.

`radloop up` runs on free ports in a temporary data dir, with a seeded, untrained phantom model
exported first (weights do not change compute time). N phantom CT studies are pushed with
dcmtk's storescu, one every `--gap` seconds (`--gap 0`: a back-to-back burst); once every study
is drafted, each stage is read back from radloop's database (study, annotation job, annotation
`timings`) and reported as p50/p95, with the burst's drain time against the sum of its
inference times. In the same run one phantom volume goes through Triton and through the
in-process backend alternately, `--repeat` times each after one warm-up each.

    python bench/annotate.py --studies 20 --gap 10 --json-out bench/results/annotate.json
    python bench/annotate.py --studies 20 --gap 0 --json-out bench/results/annotate-burst.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from agents.volume import load_series
from model_registry.inference import InferenceBackend, InProcessBackend, TritonBackend
from model_registry.repository import TritonRepository
from radloop.app.phantoms import WrittenStudy, write_study
from radloop.app.supervisor import ChildProcess
from radloop.db import Annotation, AnnotationJob, Store, Study
from radloop.domain import AnnotationState
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings, load_settings
from radloop.wait import WaitTimeout, wait_until

STORESCU = "/usr/bin/storescu"  # dcmtk's; the venv's bin holds pynetdicom's `storescu`
RADLOOP = str(Path(sys.executable).with_name("radloop"))
MODEL = "phantom-abdomen"
OVERHEAD_P50_S, OVERHEAD_P95_S, TRITON_RATIO, DRAIN_RATIO = 1.0, 1.5, 1.10, 1.2
STAGES = {  # key -> what it spans, in the order a study goes through them
    "quiet": "last instance → completed (quiet period, not counted)",
    "to_submit": "completed → job submitted (outbox dispatcher)",
    "to_start": "submitted → running on a warm worker (Prefect websocket)",
    "start_to_load": "worker took it → series load starts",
    "load_s": "load series",
    "infer_s": "inference (Triton)",
    "write_s": "write SEG + NIfTI",
    "store_s": "SEG (+ images not yet there) into Orthanc",
    "to_drafted": "completed → drafted (draft recorded)",
    "draft_overhead": "completed → drafted, less inference",
    "to_queued": "completed → offered to readers (viewable)",
    "overhead": "completed → offered, less inference",
}
PORTS = "DICOM__PORT ORTHANC__HTTP_PORT ORTHANC__DICOM_PORT PREFECT__PORT TRITON__HTTP_PORT"
PORTS += " TRITON__GRPC_PORT TRITON__METRICS_PORT REVIEW__PORT MLFLOW__PORT"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def configure(data: Path, extra: dict[str, str]) -> tuple[Settings, dict[str, str]]:
    """Free ports and a fresh data dir, set in this process (an entry point) so that its
    settings and `radloop up`'s are the same; returns both."""
    for key in [k for k in os.environ if k.startswith("RADLOOP_")]:
        del os.environ[key]
    os.environ.update({f"RADLOOP_{key}": str(free_port()) for key in PORTS.split()})
    os.environ.update(
        RADLOOP_DATA_DIR=str(data),
        RADLOOP_DICOM__QUIET_SECONDS="2",
        RADLOOP_DEMO_ON_FIRST_RUN="false",
    )
    return load_settings(), {**os.environ, "TCP_NODELAY": "1", **extra}


@contextmanager
def radloop_up(env: dict[str, str], log: Path) -> Iterator[ChildProcess]:
    """`radloop up` as a child that dies with this process; SIGINT (it stops its children)."""
    up = ChildProcess("radloop up", [RADLOOP, "up"], env, log)
    up.start()
    try:
        yield up
    finally:
        up.stop(signal.SIGINT, timeout=90)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    try:
        return wait_until(probe, timeout, interval, what)
    except WaitTimeout as error:
        raise SystemExit(str(error)) from None


def healthy(env: dict[str, str], up: ChildProcess) -> bool:
    if not up.alive():
        raise SystemExit(f"radloop up exited with {up.returncode()}; see its log")
    status = subprocess.run([RADLOOP, "status", "--json"], env=env, capture_output=True)
    return status.returncode == 0 and all(
        s["healthy"] for s in json.loads(status.stdout)["services"]
    )


def drafts(store: Store, uids: list[str]) -> dict[str, Annotation] | None:
    """Each study's draft, once every one is drafted and stored in Orthanc; else None."""
    with store.read() as session:
        rows = session.execute(
            select(Study.study_uid, Annotation)
            .join(Annotation, Annotation.study_id == Study.id)
            .where(Study.study_uid.in_(uids), Annotation.state == AnnotationState.DRAFTED.value)
        ).all()
    found = {uid: draft for uid, draft in rows}
    done = len(found) == len(uids) and all("store_s" in (d.timings or {}) for d in found.values())
    return found if done else None


def stages(store: Store, uids: list[str]) -> list[dict[str, float]]:
    """Seconds of every stage, one row per study."""
    with store.read() as session:
        studies = {
            s.study_uid: s for s in session.scalars(select(Study).where(Study.study_uid.in_(uids)))
        }
        jobs = {
            j.study_uid: j
            for j in session.scalars(select(AnnotationJob).where(AnnotationJob.study_uid.in_(uids)))
        }
    found, rows = drafts(store, uids) or {}, []
    for uid in uids:
        study, draft, job = studies[uid], found[uid], jobs[uid]
        assert draft.timings and draft.viewable_at and job.submitted_at and job.started_at, uid
        done, t = job.completed_at, draft.timings
        load_started = draft.created_at.timestamp() - t["write_s"] - t["infer_s"] - t["load_s"]
        row = {key: float(t[key]) for key in ("load_s", "infer_s", "write_s", "store_s")}
        row |= {
            "quiet": (done - study.last_received_at).total_seconds(),
            "to_submit": (job.submitted_at - done).total_seconds(),
            "to_start": (job.started_at - job.submitted_at).total_seconds(),
            "start_to_load": load_started - job.started_at.timestamp(),
            # A case is offered to readers once its images and draft are in Orthanc (issue 9).
            "to_drafted": (draft.created_at - done).total_seconds(),
            "to_queued": (draft.viewable_at - done).total_seconds(),
            "completed_at": done.timestamp(),
            "queued_at": draft.viewable_at.timestamp(),
        }
        rows.append(
            row
            | {
                "draft_overhead": row["to_drafted"] - row["infer_s"],
                "overhead": row["to_queued"] - row["infer_s"],
            }
        )
    return rows


def stub_threads(repository: Path) -> int:
    """Intra-op threads torch uses in Triton's python-backend stub: OMP_NUM_THREADS if its
    environment sets it, else torch's default, the same in any process on this machine."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes()
            if b"triton_python_backend_stub" in argv and bytes(repository) in argv:
                environ = (cmdline.parent / "environ").read_bytes().split(b"\0")
                found = [v[16:] for v in environ if v.startswith(b"OMP_NUM_THREADS=")]
                return int(found[0]) if found else torch.get_num_threads()
        except OSError:
            continue
    raise SystemExit(f"no python-backend stub serving {MODEL} found")


def compare_backends(settings: Settings, files: list[Path], repeat: int) -> dict[str, Any]:
    """Seconds for one volume through Triton and in this process, alternately (ABBA...)."""
    series = load_series(files)
    backends: dict[str, InferenceBackend] = {
        "triton": TritonBackend(settings.triton.base_url),
        "in_process": InProcessBackend(settings.model_repository),
    }
    threads = stub_threads(settings.model_repository)
    torch.set_num_threads(threads)
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    labels = {}
    for index in range(repeat + 1):  # round 0 is the warm-up (and loads the in-process model)
        for name in list(backends)[:: 1 - 2 * (index % 2)]:
            started = time.perf_counter()
            labels[name] = backends[name].infer(MODEL, series.array, series.spacing).labels
            seconds[name].append(time.perf_counter() - started)
    if not np.array_equal(labels["triton"], labels["in_process"]):
        raise SystemExit("Triton and the in-process backend disagree on the same volume")
    medians = {name: statistics.median(runs[1:]) for name, runs in seconds.items()}
    return {
        "shape": list(series.array.shape),
        "torch_threads": threads,
        "runs_s": {name: [round(s, 3) for s in runs] for name, runs in seconds.items()},
        "median_s": {name: round(s, 3) for name, s in medians.items()},
        "ratio": round(medians["triton"] / medians["in_process"], 3),
    }


def machine() -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    when = datetime.now(UTC).isoformat(timespec="seconds")
    load = round(os.getloadavg()[0], 2)
    return dict(cpus=os.cpu_count(), cpu=cpu, kernel=platform.release(), date=when, load=load)


def queue_drafted(env: dict[str, str]) -> set[str]:
    """Study UIDs `radloop queue list` shows with a draft: what a reviewer would see."""
    argv = [RADLOOP, "queue", "list", "--json", "--all"]
    rows = json.loads(subprocess.run(argv, env=env, capture_output=True, check=True).stdout)
    return {row["study_uid"] for row in rows if row["state"] == AnnotationState.DRAFTED.value}


def target(text: str, measured: float, limit: float) -> dict[str, Any]:
    return {"target": text, "measured": measured, "met": measured <= limit}


def push_all(
    settings: Settings, env: dict[str, str], studies: list[WrittenStudy], gap: float
) -> list[dict[str, float]]:
    """Push each study, one every `gap` s; once all are drafted, every stage of every study."""
    uids = [study.study_uid for study in studies]
    dicom = [STORESCU, "-aec", settings.dicom.ae_title, "127.0.0.1", str(settings.dicom.port)]
    for index, study in enumerate(studies):
        files = sorted(map(str, study.dicom_dir.glob("*.dcm")))
        subprocess.run([*dicom, *files], env=env, check=True, capture_output=True)
        time.sleep(gap if index < len(studies) - 1 else 0)
    store = Store.open(settings.effective_database_url, migrate=False)
    try:
        # Polled here, not with the CLI: a CLI call costs a CPU-second the pipeline would miss.
        wait_for("every study drafted", lambda: drafts(store, uids), 120 + 60 * len(uids))
        rows = stages(store, uids)
    finally:
        store.close()
    listed = queue_drafted(env)
    if listed != set(uids):
        raise SystemExit(f"`radloop queue list` shows {len(listed)} of {len(uids)} drafted")
    return rows


def measure(studies: int, gap: float, repeat: int, extra: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as tmp:
        work = Path(tmp)
        settings, env = configure(work / "data", extra)
        spec = load_spec(PACKAGED_MODELS / f"{MODEL}.yaml")
        torch.manual_seed(0)  # untrained weights: the compute is the same as a trained model's
        TritonRepository(settings.model_repository).export(
            spec, torch.jit.script(spec.network.build().eval())
        )
        written = [write_study(work / "phantoms", i, seed=i) for i in range(studies)]
        before = machine()
        with radloop_up(env, work / "data" / "radloop-up.log") as up:
            wait_for("every service healthy", lambda: healthy(env, up), timeout=300, interval=2)
            rows = push_all(settings, env, written, gap)
            volume = sorted(written[0].dicom_dir.glob("*.dcm"))
            backends = compare_backends(settings, volume, repeat)
    summary = {
        key: {f"p{q}": round(float(np.percentile([r[key] for r in rows], q)), 3) for q in (50, 95)}
        for key in STAGES
    }
    ratio = backends["ratio"]
    # The burst: first completion → last case offered, against the inference it needed.
    drain = max(r["queued_at"] for r in rows) - min(r["completed_at"] for r in rows)
    inference = sum(r["infer_s"] for r in rows)
    if gap > 0:
        goals = [
            target(
                f"completed → drafted less inference, p50 ≤ {OVERHEAD_P50_S} s",
                summary["draft_overhead"]["p50"],
                OVERHEAD_P50_S,
            ),
            target(
                f"completed → drafted less inference, p95 ≤ {OVERHEAD_P95_S} s",
                summary["draft_overhead"]["p95"],
                OVERHEAD_P95_S,
            ),
        ]
    else:
        goals = [
            target(
                f"burst drain ÷ sum of inference ≤ {DRAIN_RATIO}",
                round(drain / inference, 3),
                DRAIN_RATIO,
            )
        ]
    return {
        "machine": before | {"load_after": round(os.getloadavg()[0], 2)},
        "studies": studies,
        "gap_s": gap,
        "extra_env": extra,
        "stages": summary,
        "drain_s": round(drain, 3),
        "inference_sum_s": round(inference, 3),
        "per_study": [{key: round(value, 3) for key, value in row.items()} for row in rows],
        "backends": backends,
        "targets": [*goals, target(f"Triton ÷ in-process ≤ {TRITON_RATIO}", ratio, TRITON_RATIO)],
    }


def table(report: dict[str, Any]) -> Table:
    out = Table(title=f"{report['studies']} phantom studies, one every {report['gap_s']:g} s")
    out.add_column("stage")
    out.add_column("p50 s", justify="right")
    out.add_column("p95 s", justify="right")
    for key, label in STAGES.items():
        cell = report["stages"][key]
        out.add_row(label, f"{cell['p50']:.2f}", f"{cell['p95']:.2f}")
    backends = report["backends"]
    for name, seconds in backends["median_s"].items():
        out.add_row(f"one volume {backends['shape']}, {name} (median)", f"{seconds:.2f}", "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument(
        "--gap", type=float, default=10.0, help="seconds between two pushes (0: a burst)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="Triton/in-process rounds")
    more = "more environment for `radloop up`, e.g. RADLOOP_OUTBOX__POLL_SECONDS=0.1"
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help=more)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    report = measure(args.studies, args.gap, args.repeat, extra)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    console = Console()
    console.print(table(report))
    for goal in report["targets"]:
        verdict = "[green]met[/green]" if goal["met"] else "[red]missed[/red]"
        console.print(f"{goal['target']}: {goal['measured']} {verdict}")


if __name__ == "__main__":
    main()
