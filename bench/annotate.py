"""Annotation benchmark (issue 3): from a completed study to a draft in the review queue.

`radloop up` runs on free ports in a temporary data dir, with a seeded, untrained phantom model
exported first (weights do not change compute time). N phantom CT studies are pushed with
dcmtk's storescu, one every `--gap` seconds; once every study is drafted, each stage is read back
from radloop's database (study, outbox, annotation `timings`) and Prefect's API (flow run states),
and reported as p50/p95. In the same run, one volume goes through Triton and through the
in-process backend alternately, `--repeat` times each after a warm-up.

    python bench/annotate.py --studies 20 --gap 6 --json-out bench/results/annotate.json
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
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from agents.inference import InProcessBackend, TritonBackend
from agents.volume import load_series
from model_registry.repository import TritonRepository
from radloop.db import Annotation, OutboxEvent, Store, Study
from radloop.events import EventType
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.phantom import write_study
from radloop.settings import Settings, load_settings

STORESCU = "/usr/bin/storescu"
RADLOOP = str(Path(sys.executable).with_name("radloop"))
MODEL = "phantom-abdomen"
DEPLOYMENT = "annotate-study/on-study-completed"
OVERHEAD_TARGET_S, TRITON_TARGET = 2.0, 1.10
STAGES = {  # key -> what it spans, in the order a study goes through them
    "quiet": "last instance received → completed (quiet period)",
    "to_event": "completed → event accepted by Prefect (outbox)",
    "to_run": "event → flow run created (automation)",
    "to_pickup": "flow run created → picked up by the runner (poll)",
    "to_start": "picked up → flow running (subprocess start)",
    "to_flow_start": "completed → flow running",
    "flow_to_load": "flow running → task starts loading (imports, setup)",
    "load_s": "load the series",
    "infer_s": "inference (Triton)",
    "write_s": "write SEG + NIfTI",
    "to_queued": "completed → drafted in queue",
    "overhead": "completed → queued, less inference",
    "store_s": "store the SEG in Orthanc (after queued)",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def configure(data: Path, extra: dict[str, str]) -> tuple[Settings, dict[str, str]]:
    """Settings on free ports and a fresh data dir, and `radloop up`'s environment to match."""
    port = {
        name: free_port()
        for name in ("dicom", "http", "peer", "prefect", "t_http", "grpc", "metrics")
    }
    settings = load_settings(
        data_dir=data,
        dicom={"port": port["dicom"], "quiet_seconds": 2},
        orthanc={"http_port": port["http"], "dicom_port": port["peer"]},
        prefect={"port": port["prefect"]},
        triton={
            "http_port": port["t_http"],
            "grpc_port": port["grpc"],
            "metrics_port": port["metrics"],
        },
    )
    env = {
        "RADLOOP_DATA_DIR": str(data),
        "RADLOOP_DICOM__PORT": str(port["dicom"]),
        "RADLOOP_DICOM__QUIET_SECONDS": "2",
        "RADLOOP_ORTHANC__HTTP_PORT": str(port["http"]),
        "RADLOOP_ORTHANC__DICOM_PORT": str(port["peer"]),
        "RADLOOP_PREFECT__PORT": str(port["prefect"]),
        "RADLOOP_TRITON__HTTP_PORT": str(port["t_http"]),
        "RADLOOP_TRITON__GRPC_PORT": str(port["grpc"]),
        "RADLOOP_TRITON__METRICS_PORT": str(port["metrics"]),
    }
    return settings, {**os.environ, "TCP_NODELAY": "1", **env, **extra}


@contextmanager
def radloop_up(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`radloop up` in its own process group; SIGINT (it stops its children), then SIGKILL."""
    with open(log, "ab") as out:
        up = subprocess.Popen(
            [RADLOOP, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield up
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)
            try:
                up.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()


def wait_for(what: str, probe: Any, timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(env: dict[str, str], up: subprocess.Popen[bytes]) -> bool:
    if up.poll() is not None:
        raise SystemExit(f"radloop up exited with {up.returncode}; see its log")
    status = subprocess.run([RADLOOP, "status", "--json"], env=env, capture_output=True)
    return status.returncode == 0 and all(
        s["healthy"] for s in json.loads(status.stdout)["services"]
    )


def drafted(store: Store, uids: list[str]) -> dict[str, Annotation] | None:
    with store.read() as session:
        rows = session.execute(
            select(Study.study_uid, Annotation)
            .join(Annotation, Annotation.study_id == Study.id)
            .where(Study.study_uid.in_(uids), Annotation.state == "drafted")
        ).all()
    found = {uid: annotation for uid, annotation in rows}
    complete = len(found) == len(uids) and all(
        a.timings and "store_s" in a.timings for a in found.values()
    )
    return found if complete else None


def stamp(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def flow_runs(api: str) -> dict[str, dict[str, datetime]]:
    """study UID -> created, picked up (Pending) and started (Running) of its flow run."""
    with httpx.Client(base_url=api, timeout=30) as client:
        deployment = client.get(f"/deployments/name/{DEPLOYMENT}").raise_for_status().json()
        body = {"deployments": {"id": {"any_": [deployment["id"]]}}, "limit": 200}
        runs = client.post("/flow_runs/filter", json=body).raise_for_status().json()
        result = {}
        for run in runs:
            states = client.get("/flow_run_states/", params={"flow_run_id": run["id"]}).json()
            first: dict[str, datetime] = {}
            for state in sorted(states, key=lambda s: s["timestamp"]):
                first.setdefault(state["type"], stamp(state["timestamp"]))
            result[run["parameters"]["study_uid"]] = {
                "created": stamp(run["created"]),
                "pending": first["PENDING"],
                "running": stamp(run["start_time"]),
            }
    return result


def stages(
    store: Store, uids: list[str], runs: dict[str, dict[str, datetime]]
) -> list[dict[str, float]]:
    with store.read() as session:
        studies = {
            s.study_uid: s for s in session.scalars(select(Study).where(Study.study_uid.in_(uids)))
        }
        delivered = {
            str(row.payload["study_uid"]): row.delivered_at
            for row in session.scalars(
                select(OutboxEvent).where(OutboxEvent.event == EventType.STUDY_COMPLETED.value)
            )
        }
        drafts = drafted(store, uids) or {}
    rows = []
    for uid in uids:
        study, draft, run, sent = studies[uid], drafts[uid], runs[uid], delivered[uid]
        assert study.completed_at is not None and sent is not None and draft.timings is not None
        done, t = study.completed_at, draft.timings
        row = {k: float(t[k]) for k in ("load_s", "infer_s", "write_s", "store_s")}
        loaded = draft.created_at.timestamp() - t["write_s"] - t["infer_s"] - t["load_s"]
        row |= {
            "quiet": (done - study.last_received_at).total_seconds(),
            "to_event": (sent - done).total_seconds(),
            "to_run": (run["created"] - sent).total_seconds(),
            "to_pickup": (run["pending"] - run["created"]).total_seconds(),
            "to_start": (run["running"] - run["pending"]).total_seconds(),
            "to_flow_start": (run["running"] - done).total_seconds(),
            "flow_to_load": loaded - run["running"].timestamp(),
            "to_queued": (draft.created_at - done).total_seconds(),
        }
        row["overhead"] = row["to_queued"] - row["infer_s"]
        rows.append(row)
    return rows


def compare_backends(settings: Settings, files: list[Path], repeat: int) -> dict[str, Any]:
    """Median seconds of one volume through Triton and in this process, alternately."""
    series = load_series(files)
    triton, local = (
        TritonBackend(settings.triton.base_url),
        InProcessBackend(settings.model_repository),
    )
    # Triton's python-backend stub is a plain Python process with an unconfigured torch: it
    # uses torch's default intra-op thread count, so this process does too (set explicitly).
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds: dict[str, list[float]] = {"triton": [], "in_process": []}
    labels = {}
    for index in range(repeat + 1):  # round 0 is the warm-up
        for name, backend in (("triton", triton), ("in_process", local))[:: 1 - 2 * (index % 2)]:
            started = time.perf_counter()
            result = backend.infer(MODEL, series.array, series.spacing)
            if index:
                seconds[name].append(time.perf_counter() - started)
            labels[name] = result.labels
    if not np.array_equal(labels["triton"], labels["in_process"]):
        raise SystemExit("Triton and the in-process backend disagree on the same volume")
    medians = {name: statistics.median(runs) for name, runs in seconds.items()}
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
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "date": when,
        "load_avg": os.getloadavg()[0],
    }


def measure(studies: int, gap: float, repeat: int, extra: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as tmp:
        work = Path(tmp)
        settings, env = configure(work / "data", extra)
        spec = load_spec(PACKAGED_MODELS / f"{MODEL}.yaml")
        torch.manual_seed(0)
        TritonRepository(settings.model_repository).export(
            spec, torch.jit.script(spec.network.build().eval())
        )
        written = [write_study(work / "phantoms", i, seed=i) for i in range(studies)]
        uids = [w.study_uid for w in written]
        (work / "data").mkdir(parents=True, exist_ok=True)
        with radloop_up(env, work / "data" / "radloop-up.log") as up:
            wait_for("every service healthy", lambda: healthy(env, up), timeout=300, interval=2)
            for index, study in enumerate(written):
                files = sorted(map(str, study.dicom_dir.glob("*.dcm")))
                argv = [
                    STORESCU,
                    "-aec",
                    settings.dicom.ae_title,
                    "127.0.0.1",
                    str(settings.dicom.port),
                ]
                subprocess.run([*argv, *files], env=env, check=True, capture_output=True)
                if index < studies - 1:
                    time.sleep(gap)
            store = Store.open(settings.effective_database_url, migrate=False)
            try:
                wait_for(
                    "every study drafted", lambda: drafted(store, uids), timeout=120 + 60 * studies
                )
                rows = stages(store, uids, flow_runs(settings.prefect.effective_api_url))
            finally:
                store.close()
            queue = subprocess.run(
                [RADLOOP, "queue", "list", "--json", "--all"],
                env=env,
                capture_output=True,
                check=True,
            )
            listed = {r["study_uid"] for r in json.loads(queue.stdout) if r["state"] == "drafted"}
            if listed != set(uids):
                raise SystemExit(
                    f"queue lists {len(listed & set(uids))} of {studies} studies drafted"
                )
            backends = compare_backends(
                settings, sorted(written[0].dicom_dir.glob("*.dcm")), repeat
            )
    summary = {
        key: {
            "p50": round(float(np.percentile(v, 50)), 3),
            "p95": round(float(np.percentile(v, 95)), 3),
        }
        for key in STAGES
        for v in [[row[key] for row in rows]]
    }
    overhead, ratio = summary["overhead"]["p50"], backends["ratio"]
    return {
        "machine": machine(),
        "studies": studies,
        "gap_s": gap,
        "extra_env": extra,
        "stages": summary,
        "per_study": [{k: round(v, 3) for k, v in row.items()} for row in rows],
        "backends": backends,
        "targets": [
            {
                "target": f"completed → queued less inference, p50 ≤ {OVERHEAD_TARGET_S} s",
                "measured": overhead,
                "met": overhead <= OVERHEAD_TARGET_S,
            },
            {
                "target": f"Triton ÷ in-process ≤ {TRITON_TARGET}",
                "measured": ratio,
                "met": ratio <= TRITON_TARGET,
            },
        ],
    }


def table(report: dict[str, Any]) -> Table:
    out = Table(title=f"{report['studies']} phantom studies, one every {report['gap_s']} s")
    for column in ("stage", "p50 s", "p95 s"):
        out.add_column(column, justify="left" if column == "stage" else "right")
    for key, label in STAGES.items():
        cell = report["stages"][key]
        out.add_row(label, f"{cell['p50']:.2f}", f"{cell['p95']:.2f}")
    backends = report["backends"]
    for name in ("triton", "in_process"):
        label = f"one volume {backends['shape']}, {name.replace('_', '-')} (median)"
        out.add_row(label, f"{backends['median_s'][name]:.2f}", "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--gap", type=float, default=6.0, help="seconds between two pushes")
    parser.add_argument("--repeat", type=int, default=5, help="Triton/in-process rounds")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of `radloop up` (e.g. PREFECT_RUNNER_POLL_FREQUENCY=1)",
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    for key in [k for k in os.environ if k.startswith("RADLOOP_")]:
        del os.environ[key]  # the settings are this benchmark's alone
    extra = dict(item.split("=", 1) for item in args.env)
    report = measure(args.studies, args.gap, args.repeat, extra)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    console = Console()
    console.print(table(report))
    for target in report["targets"]:
        verdict = "[green]met[/green]" if target["met"] else "[red]missed[/red]"
        console.print(f"{target['target']}: {target['measured']} {verdict}")


if __name__ == "__main__":
    main()
