"""How commands print rows: a rich table for people, JSON (`--json`) for scripts — one place,
so every listing treats missing values, numbers and lists alike."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Column:
    """A table column: its header and the text of a row's cell (default: the row's value
    under the header's name)."""

    header: str
    cell: Callable[[Row], object] | None = None

    def text(self, row: Row) -> str:
        return cell_text(self.cell(row) if self.cell else row.get(self.header))


def cell_text(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def print_json(data: object) -> None:
    """JSON on standard output, nothing else: what `--json` promises scripts."""
    print(json.dumps(data, indent=2))


def print_rows(
    console: Console,
    rows: Sequence[Row],
    columns: Sequence[Column | str],
    title: str,
    as_json: bool,
) -> None:
    """`rows` as JSON, or as a table of `columns` titled `title`."""
    if as_json:
        print_json(list(rows))
        return
    table = Table(title=title)
    resolved = [Column(c) if isinstance(c, str) else c for c in columns]
    for column in resolved:
        table.add_column(column.header)
    for row in rows:
        table.add_row(*(column.text(row) for column in resolved))
    console.print(table)
