"""`radloop demo …`: run the loop without patient data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from radloop.app.commands.common import JsonOption, cli_settings, console, err_console
from radloop.app.commands.output import print_json

demo_app = typer.Typer(
    help="Turn the loop once on phantoms (`radloop demo`), or write demo data.",
    invoke_without_command=True,
)


@demo_app.callback()
def demo(
    ctx: typer.Context,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Stay up after the summary (Ctrl-C stops).")
    ] = False,
) -> None:
    """Start everything, push phantom studies over C-STORE, correct and validate the drafts as
    a simulated reader through the review API, retrain, hot-reload, draft again; summarise."""
    if ctx.invoked_subcommand is not None:
        return
    from radloop.app.cli import run_stack
    from radloop.app.commands.common import open_store
    from radloop.app.demo import Demo

    settings = cli_settings()
    # Phantoms arrive in one burst: a short quiet period completes them sooner.
    quiet = min(settings.dicom.quiet_seconds, 5.0)
    dicom = settings.dicom.model_copy(update={"quiet_seconds": quiet})
    settings = settings.model_copy(update={"dicom": dicom})
    store = open_store(settings, migrate=True)
    run_stack(
        settings,
        store,
        lambda stop: Demo(settings, store, console).run(),
        exit_after=not keep_running,
    )


@demo_app.command("data")
def demo_data(
    studies: Annotated[int, typer.Option(min=1, help="How many phantom studies.")] = 8,
    out: Annotated[
        Path | None, typer.Option(help="Where to write (default <data_dir>/demo/phantoms).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the first study; then +1 each.")] = 0,
    pool: Annotated[
        bool,
        typer.Option(
            "--pool",
            help="A heterogeneous pool: common studies plus rarer sub-populations (contrast "
            "phase, enlarged or displaced organs, lesions, noise, field of view), each "
            "study's in its truth.json.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Write CT phantom studies (DICOM) with their ground-truth masks (NIfTI + truth.json)."""
    from rich.progress import Progress

    from radloop.app.phantoms import PhantomLabel, write_study

    root = out or cli_settings().data_dir / "demo" / "phantoms"
    written = []
    with Progress(console=err_console if as_json else console, transient=as_json) as progress:
        task = progress.add_task("writing phantom studies", total=studies)
        for index in range(studies):
            written.append(write_study(root, index, seed=seed + index, pool=pool))
            progress.advance(task)
    if as_json:
        print_json([study.summary() for study in written])
        return
    slices = sum(study.slices for study in written)
    console.print(f"{studies} phantom studies ({slices} CT slices) in {root}")
    labels = ", ".join(f"{label.value} {label.name.lower()}" for label in PhantomLabel)
    console.print(f"each: dicom/*.dcm, truth.nii.gz (labels {labels}), truth.json")
    if pool:
        from collections import Counter

        from radloop.app.phantoms.pool import subpopulation_of

        mix = Counter(subpopulation_of(seed + index) for index in range(studies))
        console.print("sub-populations: " + ", ".join(f"{k} {n}" for k, n in mix.most_common()))
