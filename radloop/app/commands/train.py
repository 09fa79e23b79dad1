"""`radloop train MODEL`: retrain one model now, through the same flow the triggers start."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import select

from radloop.app.commands.common import (
    JsonOption,
    cli_model_specs,
    cli_settings,
    console,
    err_console,
    open_store,
)
from radloop.db import Store, TrainingRun, utcnow
from radloop.domain import TrainingState, TrainingTrigger

if TYPE_CHECKING:
    from radloop.modelspec import ModelSpec
    from radloop.settings import Settings

RETRAIN_DEPLOYMENT = "retrain-model/retrain"


def train(
    model: str,
    wait: Annotated[
        bool, typer.Option("--wait", help="Block until decided (and, if promoted, deployed).")
    ] = False,
    local: Annotated[
        bool,
        typer.Option("--local", help="Train in this process instead of through Prefect."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Retrain MODEL on its validated labels now: fine-tune, MLflow run, holdout gate, deploy."""
    settings = cli_settings()
    specs = cli_model_specs(settings)
    if model not in specs:
        err_console.print(f"no model spec named {model!r} (known: {', '.join(specs)})")
        raise typer.Exit(2)
    store = open_store(settings)
    if local:
        result = _train_here(settings, store, specs[model], as_json)
    else:
        requested = utcnow()
        os.environ["PREFECT_API_URL"] = settings.prefect.effective_api_url
        from prefect.deployments import run_deployment

        flow_run: Any = run_deployment(
            RETRAIN_DEPLOYMENT,
            parameters={"model": model, "trigger": TrainingTrigger.MANUAL.value},
            timeout=0,
        )
        if not wait:
            out = {"model": model, "flow_run_id": str(flow_run.id), "state": "requested"}
            print(json.dumps(out)) if as_json else console.print(f"requested: {out}")
            return
        result = _follow(store, model, requested, as_json)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(f"{model}: {result['state']} — {result.get('decision')}")
    if result["state"] in (TrainingState.FAILED, TrainingState.CANCELLED):
        raise typer.Exit(1)


def _train_here(settings: Settings, store: Store, spec: ModelSpec, quiet: bool) -> dict[str, Any]:
    from agents.retrain import Retrainer

    retrainer = Retrainer.from_settings(store, spec, settings)
    with _progress(quiet) as progress:
        task = progress.add_task("training", total=spec.retraining.epochs, loss="")
        return retrainer.run(
            TrainingTrigger.MANUAL,
            on_epoch=lambda epoch, loss: progress.update(task, completed=epoch, loss=f"{loss:.4f}"),
        )


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=err_console if quiet else console,
        transient=quiet,
    )


def _follow(store: Store, model: str, since: Any, quiet: bool) -> dict[str, Any]:
    """Show the run's epochs as the flow trains (from its training_runs row) until decided."""
    from agents.retrain import training_record

    with _progress(quiet) as progress:
        task = progress.add_task("waiting for the flow to start", total=None, loss="")
        while True:
            with store.read() as session:
                row = session.scalars(
                    select(TrainingRun)
                    .where(TrainingRun.model_name == model, TrainingRun.started_at >= since)
                    .order_by(TrainingRun.id)
                ).first()
                if row is not None:
                    progress.update(
                        task,
                        description=f"training run {row.id}",
                        total=row.epochs,
                        completed=row.epoch,
                        loss="" if row.loss is None else f"{row.loss:.4f}",
                    )
                    if row.state != TrainingState.RUNNING:
                        return training_record(store, row.id)
            time.sleep(1.0)
