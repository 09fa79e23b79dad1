"""Ingest benchmark (issue 2): the same CT slices pushed by dcmtk's storescu to three receivers.

Receivers: dcmtk `storescp --fork` (no fsync: a ceiling, not a peer with the same promise),
Orthanc (its defaults: SyncStorageArea, one fdatasync per instance file) and `radloop listen`
(fsync + rename + directory fsync and an SQLite commit with synchronous=FULL before Success).
Each receiver starts empty for every (mode, repeat) and gets a freshly generated series, so no
instance is ever a duplicate.
Modes: one association, and four storescu processes at once on a quarter of the files each.

    python bench/ingest.py --slices 200 --repeat 2 --json-out bench/results/ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from radloop.app.phantoms.ct import ct_series
from radloop.app.supervisor import Child, ChildSpec, orthanc_spec
from radloop.settings import load_settings

STORESCU, ECHOSCU, STORESCP = "/usr/bin/storescu", "/usr/bin/echoscu", "/usr/bin/storescp"
RADLOOP = str(Path(sys.executable).with_name("radloop"))
NODELAY = {**os.environ, "TCP_NODELAY": "1"}
PEERS = ("storescp", "orthanc", "radloop")
MODES = (1, 4)
# mode -> (peer radloop is compared with, minimum ratio radloop/peer)
TARGETS = {1: ("orthanc", 1.0), 4: ("storescp", 0.5)}


@dataclass(frozen=True)
class Receiver:
    aet: str
    port: int
    stored: Callable[[], int]  # instances the receiver holds now


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_echo(aet: str, port: int) -> Callable[[], bool]:
    argv = [ECHOSCU, "-aec", aet, "127.0.0.1", str(port)]
    return lambda: subprocess.run(argv, env=NODELAY, capture_output=True).returncode == 0


@contextmanager
def running(spec: ChildSpec) -> Iterator[None]:
    """A child in its own process group, healthy once it answers; SIGTERM'd (then SIGKILL'd)."""
    child = Child(spec)
    child.start()
    try:
        child.wait_healthy()
        yield
    finally:
        child.stop()


@contextmanager
def storescp(work: Path) -> Iterator[Receiver]:
    # --fork: one process per association, as a multi-association receiver must be;
    # without it storescp serves the four associations one after another.
    out, port = work / "received", free_port()
    out.mkdir()
    argv = [STORESCP, "--fork", "-aet", "STORESCP", "--output-directory", str(out), str(port)]
    url = f"dicom://127.0.0.1:{port}"
    ready = answers_echo("STORESCP", port)
    with running(ChildSpec("storescp", argv, work / "storescp.log", ready, url, NODELAY)):
        yield Receiver("STORESCP", port, lambda: sum(1 for p in out.iterdir() if p.is_file()))


@contextmanager
def orthanc(work: Path) -> Iterator[Receiver]:
    ports = {"http_port": free_port(), "dicom_port": free_port()}
    settings = load_settings(data_dir=work, orthanc=ports)
    config, spec = settings.orthanc, orthanc_spec(settings)
    http_ok, echo_ok = spec.healthy, answers_echo(config.ae_title, config.dicom_port)
    spec = replace(spec, healthy=lambda: http_ok() and echo_ok())

    def stored() -> int:
        return int(httpx.get(f"{spec.url}/statistics", timeout=10).json()["CountInstances"])

    with running(spec):
        yield Receiver(config.ae_title, config.dicom_port, stored)


@contextmanager
def radloop(work: Path) -> Iterator[Receiver]:
    port = free_port()
    env = {
        **NODELAY,
        "RADLOOP_DATA_DIR": str(work),
        "RADLOOP_DICOM__PORT": str(port),
        "RADLOOP_DICOM__QUIET_SECONDS": "60",
        "RADLOOP_PREFECT__API_URL": "http://127.0.0.1:9/api",  # nobody there: events wait
    }

    def stored() -> int:
        listing = subprocess.check_output([RADLOOP, "studies", "list", "--json"], env=env)
        return sum(int(study["instances"]) for study in json.loads(listing))

    ready = answers_echo("RADLOOP", port)
    spec = ChildSpec("radloop", [RADLOOP, "listen"], work / "radloop.log", ready, "", env, 60.0)
    with running(spec):
        yield Receiver("RADLOOP", port, stored)


RECEIVERS = {"storescp": storescp, "orthanc": orthanc, "radloop": radloop}


def push(files: list[Path], receiver: Receiver, streams: int) -> float:
    """Seconds from the start of the first storescu to the end of the last."""
    size = -(-len(files) // streams)
    groups = [files[i : i + size] for i in range(0, len(files), size)]
    argv = [STORESCU, "-aet", "BENCH", "-aec", receiver.aet, "127.0.0.1", str(receiver.port)]
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [*argv, *map(str, group)],
            env=NODELAY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    errors = [sender.communicate()[1] for sender in senders]
    elapsed = time.perf_counter() - start
    for sender, error in zip(senders, errors, strict=True):
        if sender.returncode != 0:
            raise RuntimeError(f"storescu to {receiver.aet} failed: {error.decode()[-500:]}")
    return elapsed


def run_once(peer: str, streams: int, slices: int, seed: int) -> tuple[float, int]:
    """(seconds, bytes sent) for one fresh receiver and one freshly generated series."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp:
        work = Path(tmp)
        files = ct_series(work / "series", slices, seed=seed)
        os.sync()  # the series' dirty pages must not be flushed by the receiver's fsyncs
        (work / "receiver").mkdir()
        with RECEIVERS[peer](work / "receiver") as receiver:
            seconds = push(files, receiver, streams)
            count = receiver.stored()
        if count != slices:
            raise SystemExit(f"{peer}, {streams} association(s): stored {count} of {slices}")
        return seconds, sum(f.stat().st_size for f in files)


def machine() -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "date": when}


def measure(slices: int, repeat: int) -> dict[str, Any]:
    runs: dict[str, dict[int, list[float]]] = {p: {m: [] for m in MODES} for p in PEERS}
    size = 0
    for round_ in range(repeat):
        for streams in MODES:
            order = PEERS if round_ % 2 == 0 else PEERS[::-1]  # spread drift over peers
            for peer in order:
                seconds, size = run_once(peer, streams, slices, seed=round_)
                runs[peer][streams].append(seconds)
    rate = {(p, m): statistics.median(slices / s for s in runs[p][m]) for p in PEERS for m in MODES}
    results = {
        p: {
            str(m): {
                "instances_per_s": round(rate[p, m], 1),
                "mb_per_s": round(rate[p, m] * size / slices / 1e6, 1),
                "runs_s": [round(s, 3) for s in runs[p][m]],
            }
            for m in MODES
        }
        for p in PEERS
    }
    ratios = {
        str(m): {p: round(rate["radloop", m] / rate[p, m], 2) for p in PEERS[:2]} for m in MODES
    }
    targets = [
        dict(associations=m, peer=p, minimum=t, ratio=ratios[str(m)][p], met=ratios[str(m)][p] >= t)
        for m, (p, t) in TARGETS.items()
    ]
    return {
        "machine": machine(),
        "slices": slices,
        "repeat": repeat,
        "bytes_sent": size,
        "results": results,
        "radloop_ratio": ratios,
        "targets": targets,
    }


def table(report: dict[str, Any]) -> Table:
    out = Table(
        title=f"{report['slices']} CT slices, 512×512 16-bit, "
        f"{report['bytes_sent'] / 1e6:.1f} MB; median of {report['repeat']}"
    )
    for column in ("receiver", "associations", "instances/s", "MB/s", "radloop ÷ this"):
        out.add_column(column, justify="right")
    for peer in PEERS:
        for streams in MODES:
            cell = report["results"][peer][str(streams)]
            ratio = report["radloop_ratio"][str(streams)].get(peer)
            rate, mb = f"{cell['instances_per_s']:.1f}", f"{cell['mb_per_s']:.1f}"
            out.add_row(peer, str(streams), rate, mb, "" if ratio is None else f"{ratio:.2f}×")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    report = measure(args.slices, args.repeat)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    console = Console()
    console.print(table(report))
    for target in report["targets"]:
        verdict = "[green]met[/green]" if target["met"] else "[red]missed[/red]"
        console.print(
            f"{target['associations']} association(s): radloop ÷ {target['peer']} = "
            f"{target['ratio']:.2f}× (target ≥ {target['minimum']}×) {verdict}"
        )


if __name__ == "__main__":
    main()
