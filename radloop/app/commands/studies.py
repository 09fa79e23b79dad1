"""`radloop studies …`: the studies received and their states."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from sqlalchemy import func, select

from radloop.app.commands.common import JsonOption, cli_settings, console, err_console, open_store
from radloop.app.commands.output import print_json, print_rows
from radloop.db import Instance, OutboxEvent, Series, Store, Study
from radloop.domain import StudyState

studies_app = typer.Typer(help="Studies received and their states.", no_args_is_help=True)


def _study_rows(store: Store, state: StudyState | None, limit: int) -> list[dict[str, Any]]:
    with store.read() as session:
        counts = (
            select(Instance.study_id, func.count(Instance.id).label("n"))
            .group_by(Instance.study_id)
            .subquery()
        )
        series = (
            select(Series.study_id, func.count(Series.id).label("n"))
            .group_by(Series.study_id)
            .subquery()
        )
        query = (
            select(Study, counts.c.n, series.c.n)
            .outerjoin(counts, counts.c.study_id == Study.id)
            .outerjoin(series, series.c.study_id == Study.id)
            .order_by(Study.last_received_at.desc())
            .limit(limit)
        )
        if state is not None:
            query = query.where(Study.state == state.value)
        return [
            _study_json(study, instances or 0, series_count or 0)
            for study, instances, series_count in session.execute(query)
        ]


def _study_json(study: Study, instances: int, series: int) -> dict[str, Any]:
    return {
        "study_id": study.id,
        "study_uid": study.study_uid,
        "state": study.state,
        "revision": study.revision,
        "instances": instances,
        "series": series,
        "modalities": study.modalities.split("\\") if study.modalities else [],
        "study_date": study.study_date,
        "first_received_at": study.first_received_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
        "completed_at": study.completed_at.isoformat() if study.completed_at else None,
        "reason": study.reason,
    }


@studies_app.command("list")
def studies_list(
    as_json: JsonOption = False,
    state: Annotated[StudyState | None, typer.Option(help="Only studies in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many studies.")] = 500,
) -> None:
    """List studies, most recently received first."""
    settings = cli_settings()
    store = open_store(settings)
    rows = _study_rows(store, state, limit)
    columns = ["study_uid", "state", "revision", "instances", "series", "modalities"]
    print_rows(console, rows, columns, f"{len(rows)} studies", as_json)


@studies_app.command("show")
def studies_show(study_uid: str, as_json: JsonOption = False) -> None:
    """One study with its series and the events it produced."""
    settings = cli_settings()
    store = open_store(settings)
    with store.read() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            err_console.print(f"no study with UID {study_uid}")
            raise typer.Exit(1)
        per_series = dict(
            session.execute(
                select(Instance.series_id, func.count(Instance.id))
                .where(Instance.study_id == study.id)
                .group_by(Instance.series_id)
            ).all()
        )
        series = [
            {
                "series_uid": s.series_uid,
                "modality": s.modality,
                "series_number": s.series_number,
                "description": s.description,
                "instances": per_series.get(s.id, 0),
            }
            for s in study.series
        ]
        events = [
            {
                "event": e.event,
                "event_id": e.event_id,
                "created_at": e.created_at.isoformat(),
                "delivered_at": e.delivered_at.isoformat() if e.delivered_at else None,
                "attempts": e.attempts,
                "payload": e.payload,
            }
            for e in session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.resource_id == f"radloop.study.{study_uid}")
                .order_by(OutboxEvent.id)
            )
        ]
        detail = _study_json(study, sum(per_series.values()), len(series))
    detail.update(series=series, events=events)
    if as_json:
        print_json(detail)
        return
    console.print_json(json.dumps(detail))
