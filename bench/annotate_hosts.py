"""Burst drain on one GPU host, then on two (issue 11): annotation workers on test hosts.

Network namespaces made here (`tests/cluster.py`): `gw` runs `radloop listen`, `core` runs
PostgreSQL, Prefect and Orthanc, `gpu1` and `gpu2` each run Triton and `radloop worker --queue
annotate`, all with the settings a site gets by default. A seeded, untrained phantom model is
exported first (weights do not change compute time). Round 1: only gpu1's worker is running;
N phantom CT studies are sent back to back with dcmtk's storescu. Round 2: gpu2's worker joins;
N other studies. Each round's drain time runs from the first study completed to the last one
offered to readers; it is reported against the sum of its inference times, and the two rounds
against each other. Every "host" shares this machine's cores: read the ratio with that in mind.
Needs root (network namespaces).

    python bench/annotate_hosts.py --studies 20 --json-out bench/results/annotate-hosts.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from annotate import machine  # the same machine record as the other benchmarks
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from radloop.app.phantoms import WrittenStudy
from radloop.app.supervisor import triton_spec
from radloop.db import Annotation, AnnotationJob, Store, Study
from radloop.domain import AnnotationState
from radloop.modelspec import load_spec
from radloop.wait import wait_until

# The test hosts and cluster set-up are the tests' own (tests/cluster.py): one way to build them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import MODEL, Cluster, cluster_on, workers
from tests.hosts import usable, wait_listening
from tests.models import export_version

HOSTS = ("gw", "core", "gpu1", "gpu2")


def drained(store: Store, studies: list[WrittenStudy]) -> dict[str, Any] | None:
    """The round's figures once every study is offered to readers with its draft; else None."""
    uids = [study.study_uid for study in studies]
    with store.read() as session:
        drafts = session.execute(
            select(Annotation, AnnotationJob)
            .join(Study, Study.id == Annotation.study_id)
            .join(AnnotationJob, AnnotationJob.study_uid == Study.study_uid)
            .where(
                Study.study_uid.in_(uids),
                Annotation.state == AnnotationState.DRAFTED.value,
                Annotation.viewable_at.is_not(None),
            )
        ).all()
    if len(drafts) < len(uids):
        return None
    first = min(job.completed_at for _, job in drafts)
    last = max(draft.viewable_at for draft, _ in drafts if draft.viewable_at is not None)
    inference = sum(float((draft.timings or {})["infer_s"]) for draft, _ in drafts)
    by_host: dict[str, int] = {}
    for _, job in drafts:
        host = str(job.worker).split(":")[0]
        by_host[host] = by_host.get(host, 0) + 1
    drain = (last - first).total_seconds()
    return {
        "drain_s": round(drain, 2),
        "inference_sum_s": round(inference, 2),
        "drain_per_inference": round(drain / inference, 3),
        "drafted_by": by_host,
    }


def connected(cluster: Cluster, expected: dict[str, str]) -> bool:
    return workers(cluster.store) == expected


def burst(cluster: Cluster, seeds: range) -> dict[str, Any]:
    studies = [cluster.phantom(seed) for seed in seeds]  # written before the clock matters
    cluster.send(studies)
    found = wait_until(
        lambda: drained(cluster.store, studies), 120 + 60 * len(studies), 1.0, "round drained"
    )
    return dict(found)


def measure(count: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp,
        cluster_on(Path(tmp), HOSTS) as cluster,
    ):
        net = cluster.net
        cluster.serve_orthanc_and_prefect()
        gw, gpus = net["gw"], [net["gpu1"], net["gpu2"]]
        spec = load_spec(cluster.root / "models" / f"{MODEL}.yaml")
        export_version(cluster.settings_of(gw), spec)
        for gpu in gpus:
            cluster.serve(gpu, triton_spec(cluster.settings_of(gpu), bind=gpu.address))
        allowed = f"PACS@{net.gateway}"
        cluster.radloop(
            gw,
            "listen",
            "listen",
            RADLOOP_DICOM__HOST=gw.address,
            RADLOOP_DICOM__ALLOWED_CALLERS=allowed,
        )
        wait_listening(gw.address, 11112)
        rounds = {}
        for index, gpu in enumerate(gpus):
            cluster.radloop(
                gpu,
                "worker",
                "worker",
                "--queue",
                "annotate",
                RADLOOP_TRITON__URL=f"http://{gpu.address}:8000",
            )
            expected = {g.name: "annotate" for g in gpus[: index + 1]}
            wait_until(partial(connected, cluster, expected), 180, 1.0, str(expected))
            rounds[f"{index + 1} worker(s)"] = burst(
                cluster, range(index * 1000, index * 1000 + count)
            )
    one, two = rounds.values()
    return {
        "machine": machine(),
        "studies_per_round": count,
        "worker_concurrency": "default (annotation.worker_concurrency)",
        "rounds": rounds,
        "drain_1_over_2": round(one["drain_s"] / two["drain_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="studies per round")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if (why := usable()) is not None:
        raise SystemExit(why)
    for key in [k for k in os.environ if k.startswith("RADLOOP_")]:
        del os.environ[key]
    report = measure(args.studies)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    out = Table(title=f"a burst of {args.studies} phantom studies, back to back")
    for column in (
        "annotation workers",
        "drain s",
        "Σ inference s",
        "drain ÷ Σ inference",
        "drafted by",
    ):
        out.add_column(column)
    for name, cell in report["rounds"].items():
        out.add_row(
            name,
            f"{cell['drain_s']:.1f}",
            f"{cell['inference_sum_s']:.1f}",
            f"{cell['drain_per_inference']:.2f}",
            json.dumps(cell["drafted_by"]),
        )
    console = Console()
    console.print(out)
    console.print(f"drain with 1 worker ÷ with 2: {report['drain_1_over_2']}")


if __name__ == "__main__":
    main()
