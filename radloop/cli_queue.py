"""`radloop queue …`: the review queue — drafts (and draftless studies) by priority."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select

from radloop.cli_common import JsonOption, cli_settings, console, open_store
from radloop.db import Annotation, Study
from radloop.domain import AnnotationState

queue_app = typer.Typer(help="The review queue, most informative first.", no_args_is_help=True)

OPEN = (AnnotationState.QUEUED, AnnotationState.DRAFTED, AnnotationState.CLAIMED)


@queue_app.command("list")
def queue_list(
    as_json: JsonOption = False,
    all_states: Annotated[
        bool, typer.Option("--all", help="Include closed and not-applicable annotations.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 500,
) -> None:
    """Open annotations by priority (uncertainty, highest first); draftless ones last."""
    store = open_store(cli_settings())
    query = (
        select(Annotation, Study.study_uid)
        .join(Study, Study.id == Annotation.study_id)
        .order_by(Annotation.priority.desc().nulls_last(), Annotation.created_at)
        .limit(limit)
    )
    if not all_states:
        query = query.where(Annotation.state.in_([s.value for s in OPEN]))
    with store.read() as session:
        rows: list[dict[str, Any]] = [
            {
                "annotation_id": annotation.id,
                "study_uid": study_uid,
                "revision": annotation.study_revision,
                "series_uid": annotation.series_uid,
                "state": annotation.state,
                "priority": annotation.priority,
                "model": annotation.model_name,
                "model_version": annotation.model_version,
                "seg_sop_instance_uid": annotation.seg_sop_instance_uid,
                "reason": annotation.reason,
                "created_at": annotation.created_at.isoformat(),
            }
            for annotation, study_uid in session.execute(query)
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} in the review queue")
    for column in ("annotation_id", "study_uid", "state", "priority", "model", "model_version"):
        table.add_column(column)
    for row in rows:
        priority = "—" if row["priority"] is None else f"{row['priority']:.3f}"
        table.add_row(
            str(row["annotation_id"]),
            row["study_uid"],
            row["state"],
            priority,
            row["model"],
            row["model_version"] or "—",
        )
    console.print(table)
