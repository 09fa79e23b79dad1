"""`radloop queue …`: the review queue — urgent cases, then each model's active-learning order,
draftless studies last — and the reader's actions on it, acting as a named user with that
user's role."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from radloop.app.commands.common import (
    JsonOption,
    cli_model_specs,
    cli_settings,
    console,
    err_console,
    open_store,
)
from radloop.app.commands.output import Column, Row, print_json, print_rows

if TYPE_CHECKING:
    from agents.review.auth import Principal
    from agents.review.worklist import Worklist

queue_app = typer.Typer(help="The review queue, most informative first.", no_args_is_help=True)

UserOption = Annotated[
    str,
    typer.Option(
        "--user", envvar="RADLOOP_USER", help="Act as this radloop user (see `radloop users`)."
    ),
]


def _worklist() -> Worklist:
    from agents.review.worklist import Worklist

    settings = cli_settings()
    return Worklist(
        open_store(settings),
        settings.review,
        cli_model_specs(settings),
        settings.spool_dir,
        settings.drafts_dir,
        settings.shared_store("datasets"),
    )


def _acting(worklist: Worklist, name: str, roles: frozenset[Any]) -> Principal:
    from agents.review.auth import Principal, Users

    found = {u["name"]: u for u in Users(worklist.store).list()}.get(name)
    if found is None or found["disabled_at"]:
        err_console.print(f"[red]no active user {name!r}[/red] (radloop users add)")
        raise typer.Exit(2)
    who = Principal(name, found["role"])  # type: ignore[arg-type]
    if not who.may(roles):
        err_console.print(f"[red]role {found['role']} may not do this[/red]")
        raise typer.Exit(2)
    return who


def _act(action: str, annotation_id: int, user: str, as_json: bool) -> None:
    from agents.review.auth import CORRECT, VALIDATE
    from agents.review.worklist import ReviewError

    worklist = _worklist()
    who = _acting(worklist, user, VALIDATE if action == "validate" else CORRECT)
    try:
        if action == "claim":
            item = worklist.claim(annotation_id, who.name)
        elif action == "release":
            item = worklist.release(annotation_id, who.name, force=who.may(VALIDATE))
        elif action == "accept":
            item = worklist.accept_draft(annotation_id, who.name)
        else:
            item = worklist.validate(annotation_id, who.name)
    except ReviewError as refused:
        err_console.print(f"[red]refused:[/red] {refused}")
        raise typer.Exit(1) from None
    if as_json:
        print_json(item)
    else:
        console.print(f"annotation {annotation_id}: {item['state']}")


@queue_app.command("claim")
def claim(annotation_id: int, user: UserOption, as_json: JsonOption = False) -> None:
    """Hold a case for review.lease_minutes (claiming again renews the lease)."""
    _act("claim", annotation_id, user, as_json)


@queue_app.command("release")
def release(annotation_id: int, user: UserOption, as_json: JsonOption = False) -> None:
    """Give a claimed case back to the worklist."""
    _act("release", annotation_id, user, as_json)


@queue_app.command("accept")
def accept(annotation_id: int, user: UserOption, as_json: JsonOption = False) -> None:
    """The claimed draft needs no change: record it as the correction."""
    _act("accept", annotation_id, user, as_json)


@queue_app.command("validate")
def validate(annotation_id: int, user: UserOption, as_json: JsonOption = False) -> None:
    """Accept a correction as a training label (reviewer or admin)."""
    _act("validate", annotation_id, user, as_json)


@queue_app.command("next")
def next_cases(
    users: Annotated[
        list[str],
        typer.Option(
            "--user",
            envvar="RADLOOP_USER",
            help="A reader asking for work; give it once per reader to hand out a batch.",
        ),
    ],
    model: Annotated[str | None, typer.Option(help="Only this model's cases.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Claim the next case for each reader, chosen together (a diversity-aware strategy gives
    no two of them near-duplicates) and recorded as one batch of selections."""
    from agents.review.auth import CORRECT

    worklist = _worklist()
    readers = [_acting(worklist, name, CORRECT).name for name in users]
    if len(set(readers)) != len(readers):
        err_console.print("[red]each reader once[/red]")
        raise typer.Exit(2)
    given = worklist.next_cases(readers, model=model)
    columns: list[Column | str] = [
        "annotation_id",
        "study_uid",
        Column("reader", lambda row: row["claimed_by"] or ""),
        Column("selected by", _selected_by),
        Column("model", lambda row: f"{row['model']} v{row['model_version'] or '—'}"),
    ]
    print_rows(console, given, columns, f"{len(given)} of {len(readers)} readers served", as_json)
    if len(given) < len(readers):
        raise typer.Exit(1)


def _selected_by(row: Row) -> str:
    selection = row.get("selection") or {}
    value = selection.get("value")
    shown = f" {value:.3f}" if isinstance(value, float) else ""
    return f"{selection.get('strategy', '—')}{shown} (rank {selection.get('rank', '—')})"


@queue_app.command("list")
def queue_list(
    as_json: JsonOption = False,
    all_states: Annotated[
        bool, typer.Option("--all", help="Include closed and not-applicable annotations.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 500,
) -> None:
    """Open annotations in the worklist's order: urgent ones, then each model's active-learning
    strategy, draftless ones last; `--json` adds each one's selection and scores."""
    from agents.review.worklist import OPEN_STATES

    rows = _worklist().items(states=None if all_states else OPEN_STATES, limit=limit)
    columns: list[Column | str] = [
        "annotation_id",
        "study_uid",
        "state",
        "rank",
        Column("selected by", _selected_by),
        Column("model", lambda row: f"{row['model']} v{row['model_version'] or '—'}"),
        Column("held by", lambda row: row["claimed_by"] or ""),
        Column("why", _why),
    ]
    print_rows(console, rows, columns, f"{len(rows)} in the review queue", as_json)


def _why(row: Row) -> str:
    why = [row["reason"]] if row["reason"] else []
    if not row["viewable"]:
        why.append(row["viewer_error"] or "images being stored for the viewer")
    return "; ".join(why)
