"""What every `radloop` sub-command shares: settings that stop with a clear message, consoles,
the `--json` option."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console

from radloop.db import SchemaOutdated, Store
from radloop.modelspec import ModelSpec, ModelSpecError, load_specs
from radloop.settings import Settings, load_settings
from radloop.settings_errors import SettingsError

console = Console()
# Errors are not wrapped: a reader (or a script) may grep them.
err_console = Console(stderr=True, soft_wrap=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def cli_settings() -> Settings:
    """Validated settings, or exit 2 naming each wrong key."""
    try:
        return load_settings()
    except SettingsError as error:
        err_console.print(f"[red]radloop: invalid settings[/red]\n{error}", highlight=False)
        raise typer.Exit(2) from None


def open_store(settings: Settings, migrate: bool = False) -> Store:
    """The state store. Services (`up`, `listen`, `review serve`, `demo`) pass `migrate` and
    upgrade the schema at start; other commands exit 2 on an outdated one."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return Store.open(settings.effective_database_url, migrate=migrate)
    except SchemaOutdated as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


def cli_model_specs(settings: Settings, *, networks: bool = False) -> dict[str, ModelSpec]:
    """Every model spec, validated, or exit 2 naming the file and key of each error. Only
    commands that build a network ask for `networks` to be checked (it imports MONAI)."""
    try:
        return load_specs(settings.effective_models_dir, networks=networks)
    except ModelSpecError as error:
        err_console.print(f"[red]invalid model spec[/red]\n{error}", highlight=False)
        raise typer.Exit(2) from None


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # pynetdicom narrates every PDU at INFO; its warnings are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


@contextmanager
def prefect_client(settings: Settings) -> Iterator[None]:
    """Prefect's client settings from radloop's, in Prefect's settings context (threads that
    should see them get a copy of the context): the API, and the shared storage where background
    tasks' parameters and results live, which submitters and workers on every host must share
    (`flows.storage`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.storage import storage_settings

    updates = {PREFECT_API_URL: settings.prefect.effective_api_url, **storage_settings(settings)}
    with temporary_settings(updates=updates):
        yield
