"""Ingest benchmark (issue 2): the same CT slices pushed by dcmtk's storescu to three receivers.

Receivers: dcmtk `storescp` (no fsync: a ceiling, not a peer with the same promise), Orthanc
(its defaults: SyncStorageArea on) and `radloop listen` (fsync + rename + directory fsync and
an SQLite commit with synchronous=FULL before Success). Each receiver starts empty for every
(mode, repeat) and gets a freshly generated series, so no instance is ever a duplicate.
Modes: one association, and four storescu processes at once on a quarter of the files each.

    python bench/ingest.py --slices 200 --repeat 2 --json-out bench/results/ingest.json
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from radloop.settings import load_settings
from radloop.supervisor import Child, orthanc_spec
from radloop.synthetic import ct_series

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


def wait_for_echo(
    aet: str, port: int, process: subprocess.Popen[bytes], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    argv = [ECHOSCU, "-aec", aet, "127.0.0.1", str(port)]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{aet} exited with {process.returncode} during start-up")
        if subprocess.run(argv, env=NODELAY, capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{aet} on port {port} did not answer C-ECHO within {timeout:.0f} s")


@contextmanager
def spawned(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group, SIGTERM'd (then SIGKILL'd) with its children on exit."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def storescp(work: Path) -> Iterator[Receiver]:
    # --fork: one process per association, as a multi-association receiver must be;
    # without it storescp serves the four associations one after another.
    out, port = work / "received", free_port()
    out.mkdir()
    argv = [STORESCP, "--fork", "-aet", "STORESCP", "--output-directory", str(out), str(port)]
    with spawned(argv, NODELAY, work / "storescp.log") as process:
        wait_for_echo("STORESCP", port, process)
        yield Receiver("STORESCP", port, lambda: sum(1 for p in out.iterdir() if p.is_file()))


@contextmanager
def orthanc(work: Path) -> Iterator[Receiver]:
    settings = load_settings(
        data_dir=work, orthanc={"http_port": free_port(), "dicom_port": free_port()}
    )
    child = Child(orthanc_spec(settings))
    child.start()
    try:
        child.wait_healthy()
        url = child.spec.url

        def stored() -> int:
            return int(httpx.get(f"{url}/statistics", timeout=10).json()["CountInstances"])

        assert child.process is not None
        wait_for_echo(settings.orthanc.ae_title, settings.orthanc.dicom_port, child.process)
        yield Receiver(settings.orthanc.ae_title, settings.orthanc.dicom_port, stored)
    finally:
        child.stop()


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
        listing = subprocess.run(
            [RADLOOP, "studies", "list", "--json"],
            env=env,
            capture_output=True,
            check=True,
            text=True,
        )
        return sum(int(study["instances"]) for study in json.loads(listing.stdout))

    with spawned([RADLOOP, "listen"], env, work / "radloop.log") as process:
        wait_for_echo("RADLOOP", port, process)
        yield Receiver("RADLOOP", port, stored)


RECEIVERS = {"storescp": storescp, "orthanc": orthanc, "radloop": radloop}


def push(files: list[Path], receiver: Receiver, streams: int) -> float:
    """Seconds from the start of the first storescu to the end of the last."""
    size = -(-len(files) // streams)
    groups = [files[i : i + size] for i in range(0, len(files), size)]
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [
                STORESCU,
                "-aet",
                "BENCH",
                "-aec",
                receiver.aet,
                "127.0.0.1",
                str(receiver.port),
                *map(str, group),
            ],
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
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_kb / 2**20, 1),
        "kernel": platform.release(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def measure(slices: int, repeat: int) -> dict[str, Any]:
    runs: dict[str, dict[int, list[float]]] = {p: {m: [] for m in MODES} for p in PEERS}
    size = 0
    for round_ in range(repeat):
        for streams in MODES:
            order = PEERS if round_ % 2 == 0 else PEERS[::-1]  # spread drift over peers
            for peer in order:
                seconds, size = run_once(peer, streams, slices, seed=round_)
                runs[peer][streams].append(seconds)
    results: dict[str, Any] = {}
    for peer in PEERS:
        results[peer] = {}
        for streams in MODES:
            rate = statistics.median(slices / s for s in runs[peer][streams])
            results[peer][str(streams)] = {
                "instances_per_s": round(rate, 1),
                "mb_per_s": round(rate * size / slices / 1e6, 1),
                "runs_s": [round(s, 3) for s in runs[peer][streams]],
            }
    ratios = {
        str(m): {
            p: round(
                results["radloop"][str(m)]["instances_per_s"]
                / results[p][str(m)]["instances_per_s"],
                2,
            )
            for p in PEERS[:2]
        }
        for m in MODES
    }
    targets = [
        {
            "associations": m,
            "peer": p,
            "minimum": t,
            "ratio": ratios[str(m)][p],
            "met": ratios[str(m)][p] >= t,
        }
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
            out.add_row(
                peer,
                str(streams),
                f"{cell['instances_per_s']:.1f}",
                f"{cell['mb_per_s']:.1f}",
                "" if ratio is None else f"{ratio:.2f}×",
            )
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
