"""Readers under load (issue 14, item 3): locust's simulated readers on the review service's
worklist, claims and label saves; latency percentiles and error rate per request.

Set-up, with radloop's own code: a fresh data dir on free ports (SQLite); an untrained version
of the packaged phantom-abdomen model (weights do not change the review service's work); N
phantom studies received through the listener's ingest path (`Ingestor`, then completed) and
drafted by the `Annotator` the annotation workers run, here in this process with the in-process
backend — Triton, Prefect and Orthanc are not started, since this measures the review service,
not drafting (bench/annotate.py does that). One reader user (own API token) per simulated
reader. Then `radloop review serve` in its own process, and locust, headless, in another
(`bench/review_locust.py` says what a reader does).

After the run the corrections saved in the database are counted against the label uploads
locust saw answered 200: under load nothing may be lost or doubled.

    python bench/review_load.py --studies 40 --users 50 --seconds 180 \
        --json-out bench/results/review-load.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from annotate import configure, machine
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from agents.review.auth import Users
from radloop.app.supervisor import Child, review_spec
from radloop.db import Annotation, Store
from radloop.domain import AnnotationState, Role
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.drafted import annotator, received_phantom
from tests.models import export_version

LOCUSTFILE = Path(__file__).with_name("review_locust.py")


def drafted_cases(settings: Settings, store: Store, studies: int, root: Path) -> dict[str, str]:
    """`studies` phantoms received and drafted; returns study UID -> ground-truth NIfTI."""
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    annotate = annotator(store, settings, None)
    labels = {}
    for index in range(studies):
        study = received_phantom(store, settings, root, seed=2000 + index)
        annotate.annotate(study.study_uid, 1, spec)
        labels[study.study_uid] = str(study.truth)
    return labels


def corrected(store: Store) -> int:
    with store.read() as session:
        query = select(func.count()).where(Annotation.state == AnnotationState.CORRECTED.value)
        return int(session.scalar(query.select_from(Annotation)) or 0)


def run_locust(url: str, plan: Path, users: int, seconds: int, out: Path) -> list[dict[str, Any]]:
    prefix = out / "locust"
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    argv += ["-u", str(users), "-r", str(max(1, users // 10)), "-t", f"{seconds}s"]
    argv += ["--host", url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]
    env = {**os.environ, "RADLOOP_LOAD_PLAN": str(plan)}
    with (out / "locust.log").open("wb") as log:
        subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    with (prefix.parent / "locust_stats.csv").open() as stats:
        rows = list(csv.DictReader(stats))
    return [
        {
            "request": row["Name"],  # "Aggregated": all requests
            "count": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "error_rate": round(int(row["Failure Count"]) / max(1, int(row["Request Count"])), 4),
            "p50_ms": float(row["50%"]),
            "p95_ms": float(row["95%"]),
            "p99_ms": float(row["99%"]),
            "rps": round(float(row["Requests/s"]), 2),
        }
        for row in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=180)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="bench-review-load-") as tmp:
        work = Path(tmp)
        settings, _ = configure(work / "data", {})
        store = Store.open(settings.effective_database_url, migrate=True)
        started = time.monotonic()
        with console.status(f"drafting {args.studies} phantom studies in-process"):
            labels = drafted_cases(settings, store, args.studies, work / "phantoms")
        console.print(f"{args.studies} cases drafted in {time.monotonic() - started:.0f} s")
        users = Users(store)
        tokens = [users.add(f"reader{i:02d}", Role.READER) for i in range(args.users)]
        plan = work / "plan.json"
        plan.write_text(json.dumps({"tokens": tokens, "labels": labels}))
        before = corrected(store)
        child = Child(review_spec(settings))
        child.start()
        try:
            child.wait_healthy()
            at_start = machine()
            rows = run_locust(settings.review.base_url, plan, args.users, args.seconds, work)
        finally:
            child.stop()
        saves = next(r for r in rows if r["request"] == "PUT /api/annotations/{id}/label")
        saved = corrected(store) - before
        store.close()
    report = {
        "machine": at_start,
        "studies": args.studies,
        "users": args.users,
        "seconds": args.seconds,
        "requests": rows,
        "labels_saved_200": saves["count"] - saves["failures"],
        "corrections_in_database": saved,
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title=f"{args.users} readers, {args.seconds} s, {args.studies} cases")
    for column in ("request", "count", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["request"],
            str(row["count"]),
            f"{100 * row['error_rate']:.2f}%",
            f"{row['p50_ms']:.0f}",
            f"{row['p95_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            f"{row['rps']:.1f}",
        )
    Console().print(table)
    Console().print(
        f"label saves answered 200: {report['labels_saved_200']}; "
        f"corrections in the database: {saved}"
    )


if __name__ == "__main__":
    main()
