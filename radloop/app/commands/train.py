"""`radloop train MODEL`: retrain one model now, through the same flow the triggers start."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

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
from radloop.app.commands.output import print_json
from radloop.db import Store, TrainingRun, utcnow
from radloop.domain import RETRAIN_DEPLOYMENT, TrainingState, TrainingTrigger
from radloop.wait import WaitTimeout, wait_until

if TYPE_CHECKING:
    from radloop.modelspec import ModelSpec
    from radloop.settings import Settings


def train(
    model: str,
    wait: Annotated[
        bool, typer.Option("--wait", help="Block until decided (and, if promoted, deployed).")
    ] = False,
    local: Annotated[
        bool,
        typer.Option("--local", help="Train in this process instead of through Prefect."),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=1,
            help="With --wait: give up (exit 1) after this many seconds "
            "(default: retrain.wait_timeout_seconds, 1 h).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Retrain MODEL on its validated labels now: fine-tune, MLflow run, holdout gate, deploy."""
    settings = cli_settings()
    specs = cli_model_specs(settings)
    # Task models, and their interactive models by their own names.
    models = {
        **specs,
        **{s.as_interactive().name: s.as_interactive() for s in specs.values() if s.interactive},
    }
    if model not in models:
        err_console.print(f"no model named {model!r} (known: {', '.join(models)})")
        raise typer.Exit(2)
    store = open_store(settings)
    if local:
        result: dict[str, Any] | None = _train_here(settings, store, models[model], as_json)
    else:
        result = _through_prefect(settings, store, model, wait, timeout, as_json)
    if result is None:
        return
    if as_json:
        print_json(result)
    else:
        console.print(f"{model}: {result['state']} — {result.get('decision')}")
    if result["state"] in (TrainingState.FAILED, TrainingState.CANCELLED):
        raise typer.Exit(1)


def _through_prefect(
    settings: Settings, store: Store, model: str, wait: bool, timeout: float | None, quiet: bool
) -> dict[str, Any] | None:
    """Request a run of the retrain deployment; with `wait`, follow it to its decision."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    requested = utcnow()
    # Prefect's settings context, not this process's environment.
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect.effective_api_url}):
        flow_run: Any = run_deployment(
            RETRAIN_DEPLOYMENT,
            parameters={"model": model, "trigger": TrainingTrigger.MANUAL.value},
            timeout=0,
        )
        if not wait:
            out = {"model": model, "flow_run_id": str(flow_run.id), "state": "requested"}
            print_json(out) if quiet else console.print(f"requested: {out}")
            return None
        limit = timeout or settings.retrain.wait_timeout_seconds
        return _follow(store, model, requested, flow_run.id, limit, quiet)


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


def _follow(
    store: Store, model: str, since: Any, flow_run_id: UUID, timeout: float, quiet: bool
) -> dict[str, Any]:
    """Show the run's epochs as the flow trains (from its training_runs row) until decided;
    exit 1 when it is not decided within `timeout` seconds. A flow run that ends without
    deciding a training (it found one running, it crashed) is reported as such."""
    from prefect.client.orchestration import get_client

    from agents.retrain import training_record

    def latest() -> TrainingRun | None:
        with store.read() as session:
            return session.scalars(
                select(TrainingRun)
                .where(TrainingRun.model_name == model, TrainingRun.started_at >= since)
                .order_by(TrainingRun.id)
            ).first()

    with _progress(quiet) as progress, get_client(sync_client=True) as client:
        task = progress.add_task("waiting for the flow to start", total=None, loss="")
        flow_run = client.read_flow_run(flow_run_id)

        def decided() -> dict[str, Any] | None:
            nonlocal flow_run
            row = latest()
            if row is not None:
                progress.update(
                    task,
                    description=f"training run {row.id}",
                    total=row.epochs,
                    completed=row.epoch,
                    loss="" if row.loss is None else f"{row.loss:.4f}",
                )
                if row.state != TrainingState.RUNNING.value:
                    return training_record(store, row.id)
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is None or not flow_run.state.is_final():
                return None
            row = latest()  # it may have been decided since the first look
            if row is not None and row.state != TrainingState.RUNNING.value:
                return training_record(store, row.id)
            return _ended_undecided(model, flow_run, row)

        try:
            return wait_until(decided, timeout, interval=1.0, what=f"training of {model}")
        except WaitTimeout:
            pass
    state = flow_run.state.name if flow_run.state else "unknown"
    err_console.print(
        f"radloop train: {model} not decided within {timeout:g} s; flow run {flow_run.name} "
        f"is {state} (it goes on in Prefect: {RETRAIN_DEPLOYMENT})"
    )
    raise typer.Exit(1)


def _ended_undecided(model: str, flow_run: Any, row: TrainingRun | None) -> dict[str, Any]:
    """The record of a flow run that ended without a decided training."""
    state = flow_run.state
    if state.is_completed():  # a manual request is always due: another run was training
        verdict = "skipped"
        decision = f"flow run {flow_run.name} found a training of {model} already running"
    else:
        verdict = "failed"
        decision = f"flow run {flow_run.name} {state.name}: {state.message}"
    return {
        "model": model,
        "flow_run_id": str(flow_run.id),
        "training_run_id": None if row is None else row.id,
        "state": verdict,
        "decision": decision,
    }
