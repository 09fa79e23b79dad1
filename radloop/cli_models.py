"""`radloop models …`: the models radloop knows, from their specs (and, later, the registry)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from radloop.cli_common import JsonOption, cli_model_specs, cli_settings, console

models_app = typer.Typer(help="Model specs and versions.", no_args_is_help=True)


@models_app.command("list")
def models_list(as_json: JsonOption = False) -> None:
    """One row per model version; a spec with no version yet appears once with version null."""
    specs = cli_model_specs(cli_settings())
    # No registry yet (issue 5): every spec is listed without a version.
    rows: list[dict[str, Any]] = [
        {
            "name": spec.name,
            "version": None,
            "aliases": [],
            "served": False,
            "labels": [label.name for label in spec.labels],
            "modality": spec.input.modality,
        }
        for spec in specs.values()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} model versions")
    for column in ("name", "version", "aliases", "served", "labels"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            str(row["version"] or "—"),
            ",".join(row["aliases"]),
            "yes" if row["served"] else "no",
            ", ".join(row["labels"]),
        )
    console.print(table)


@models_app.command("check")
def models_check() -> None:
    """Validate every spec in the models folder; exit 2 naming the file and key of each error."""
    specs = cli_model_specs(cli_settings())
    for spec in specs.values():
        console.print(f"{spec.name}: ok ({len(spec.labels)} labels, {spec.network.name})")
