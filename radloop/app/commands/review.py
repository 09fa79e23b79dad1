"""`radloop review serve` and `radloop users …`: the review service and who may use it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated

import typer

from radloop.app.commands.common import (
    JsonOption,
    cli_model_specs,
    cli_settings,
    console,
    err_console,
    open_store,
)
from radloop.app.commands.output import print_json, print_rows
from radloop.domain import Role

if TYPE_CHECKING:
    from agents.review.auth import Users

review_app = typer.Typer(help="The review service (worklist, OHIF, DICOMweb proxy).")
users_app = typer.Typer(help="Users of the review service and their roles.", no_args_is_help=True)


@review_app.command("serve")
def serve() -> None:
    """Serve the worklist, REST API (/docs), OHIF and the DICOMweb proxy."""
    import uvicorn

    from agents.review.app import create_app

    settings = cli_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings, open_store(settings, migrate=True), cli_model_specs(settings))
    review = settings.review
    tls = review.tls
    # No access log: QIDO query strings can carry patient names (OHIF's study search).
    uvicorn.run(
        app,
        host=review.host,
        port=review.port,
        access_log=False,
        log_config=None,
        ssl_certfile=tls.cert_file if tls else None,
        ssl_keyfile=tls.key_file if tls else None,
    )


def _users() -> Users:
    from agents.review.auth import Users

    return Users(open_store(cli_settings()))


@users_app.command("add")
def add(
    name: str,
    role: Annotated[Role, typer.Option(help="What the user may do.")],
    password: Annotated[
        bool, typer.Option("--password", help="Ask for a password for the login page.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Create a user; prints their API token once (it is also their login until a password)."""
    from agents.review.auth import UserExists, WeakPassword

    secret = (
        typer.prompt("password", hide_input=True, confirmation_prompt=True) if password else None
    )
    try:
        token = _users().add(name, role, secret)
    except (UserExists, WeakPassword) as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        print_json({"name": name, "role": role.value, "token": token})
    else:
        console.print(f"user [bold]{name}[/bold] ({role.value}); API token, shown once:")
        print(token)


@users_app.command("token")
def token(name: str) -> None:
    """Issue a new API token (the old one stops working; browser sessions end)."""
    try:
        print(_users().rotate_token(name))
    except KeyError:
        err_console.print(f"[red]no user {name!r}[/red]")
        raise typer.Exit(1) from None


@users_app.command("disable")
def disable(name: str) -> None:
    """Stop a user's token, password and sessions."""
    try:
        _users().disable(name)
    except KeyError:
        err_console.print(f"[red]no user {name!r}[/red]")
        raise typer.Exit(1) from None


@users_app.command("list")
def list_users(as_json: JsonOption = False) -> None:
    rows = _users().list()
    columns = ["name", "role", "created_at", "disabled_at"]
    print_rows(console, rows, columns, f"{len(rows)} users", as_json)
