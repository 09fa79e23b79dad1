"""`radloop models …`: the models radloop knows, from their specs (and, later, the registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from radloop.app.commands.common import (
    JsonOption,
    cli_model_specs,
    cli_settings,
    console,
    err_console,
    open_store,
)
from radloop.app.commands.output import Column, print_json, print_rows
from radloop.modelspec import ModelSpec
from radloop.settings import Settings

models_app = typer.Typer(help="Model specs and versions.", no_args_is_help=True)


@models_app.command("list")
def models_list(as_json: JsonOption = False) -> None:
    """One row per model version: MLflow aliases and holdout Dice, and whether Triton serves
    it; a spec with no version yet appears once with version null."""
    from model_registry.inference import InferenceUnavailable, TritonBackend
    from model_registry.mlflow_registry import Registry, RegistryUnavailable
    from model_registry.repository import model_repository

    settings = cli_settings()
    specs = cli_model_specs(settings)
    repository = model_repository(settings)
    backend = TritonBackend(settings.triton.base_url)
    registry = Registry(settings.mlflow.effective_tracking_uri)
    mlflow_up = registry.reachable()
    rows: list[dict[str, Any]] = []
    for spec in specs.values():
        try:
            ready = set(backend.served_versions(spec.name))
        except InferenceUnavailable:
            ready = set()
        try:
            listed = registry.versions(spec.name) if mlflow_up else []
            registered = {v.triton_version: v for v in listed}
        except RegistryUnavailable:
            registered = {}
        champion = repository.champion(spec.name)
        versions: list[int | None] = [*repository.versions(spec.name)] or [None]
        for version in versions:
            entry = registered.get(version)
            rows.append(
                {
                    "name": spec.name,
                    "version": version,
                    "mlflow_version": entry.version if entry else None,
                    "aliases": entry.aliases if entry else [],
                    "holdout_dice": entry.holdout_dice if entry else None,
                    # The version drafts come from, and Triton has it loaded.
                    "served": version == champion and str(version) in ready,
                    "labels": [label.name for label in spec.labels],
                    "modality": spec.input.modality,
                }
            )
    columns: list[Column | str] = [
        "name",
        "version",
        Column("mlflow", lambda row: row["mlflow_version"]),
        "aliases",
        Column("holdout Dice", lambda row: row["holdout_dice"]),
        "served",
    ]
    print_rows(console, rows, columns, f"{len(rows)} model versions", as_json)


@models_app.command("strategy")
def strategy(
    model: Annotated[
        str | None, typer.Argument(help="The model; omitted: list every model's.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Argument(
            help="random | entropy | mc_dropout | flip_tta | diversity | hybrid; omitted: show."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="The seed it draws with.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show or set a model's active-learning strategy: setting it re-ranks the model's open
    cases at once (the review service reads it on every worklist read)."""
    import getpass

    from agents.review.cases import ReviewError
    from agents.review.order import QueueOrder
    from radloop.db import utcnow

    settings = cli_settings()
    order = QueueOrder(open_store(settings), cli_model_specs(settings))
    if model is not None and name is not None:
        try:
            order.set_strategy(model, name, seed, f"cli:{getpass.getuser()}", utcnow())
        except ReviewError as refused:
            err_console.print(f"[red]refused:[/red] {refused}")
            raise typer.Exit(1) from None
    rows = [
        {
            "model": key,
            "strategy": chosen.strategy,
            "seed": chosen.seed,
            "changed_by": chosen.changed_by,
            "changed_at": chosen.changed_at.isoformat() if chosen.changed_at else None,
        }
        for key, chosen in order.settings().items()
        if model is None or key == model
    ]
    if model is not None and not rows:
        err_console.print(f"[red]no model {model!r}[/red]")
        raise typer.Exit(2)
    print_rows(console, rows, ["model", "strategy", "seed", "changed_by"], "strategies", as_json)


@models_app.command("rollback")
def rollback(
    model: str,
    to: Annotated[
        int | None, typer.Option("--to", help="Triton version (default: the previous one).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Serve an earlier version again: hot reload in Triton, `champion` moved in MLflow."""
    from model_registry.deploy import DeployFailed, hot_reload
    from model_registry.inference import TritonBackend
    from model_registry.mlflow_registry import CHAMPION, Registry, RegistryUnavailable
    from model_registry.repository import model_repository
    from radloop.events import EventType, ModelEvent, record_event

    settings = cli_settings()
    spec = _spec(settings, model)
    repository = model_repository(settings)
    current = repository.champion(model)
    target = to if to is not None else repository.previous_champion(model)
    if target is None or target not in repository.versions(model):
        err_console.print(
            f"{model}: no version to roll back to (have {repository.versions(model)})"
        )
        raise typer.Exit(2)
    try:
        deployed = hot_reload(repository, TritonBackend(settings.triton.base_url), spec, target)
    except DeployFailed as error:
        err_console.print(f"[red]rollback failed, v{current} still serves:[/red] {error}")
        raise typer.Exit(1) from None
    mlflow_version = None
    try:
        registry = Registry(settings.mlflow.effective_tracking_uri)
        if not registry.reachable():
            raise RegistryUnavailable("not answering")
        entry = registry.by_triton_version(model, target)
        if entry is not None:
            registry.set_alias(model, CHAMPION, entry.version)
            mlflow_version = entry.version
    except RegistryUnavailable as error:
        err_console.print(f"MLflow not updated ({error}); Triton serves v{target}")
    store = open_store(settings)
    with store.transaction() as session:
        record_event(
            session,
            ModelEvent(
                kind=EventType.MODEL_ROLLED_BACK,
                model=model,
                mlflow_version=mlflow_version,
                triton_version=target,
                previous_triton_version=current,
            ),
        )
    result = {
        "name": model,
        "version": target,
        "previous": current,
        "mlflow_version": mlflow_version,
        "seconds": round(deployed.total_seconds, 2),
    }
    if as_json:
        print_json(result)
    else:
        console.print(f"{model}: v{current} → v{target} (MLflow champion: {mlflow_version or '—'})")


@models_app.command("check")
def models_check() -> None:
    """Validate every spec in the models folder; exit 2 naming the file and key of each error."""
    specs = cli_model_specs(cli_settings(), networks=True)
    for spec in specs.values():
        console.print(f"{spec.name}: ok ({len(spec.labels)} labels, {spec.network.name})")


def _spec(settings: Settings, name: str) -> ModelSpec:
    specs = cli_model_specs(settings, networks=True)
    if name not in specs:
        err_console.print(f"no model spec named {name!r} (known: {', '.join(specs) or 'none'})")
        raise typer.Exit(2)
    return specs[name]


def _publish(
    settings: Settings,
    spec: ModelSpec,
    network: Any,
    out: Console = console,
    *,
    interactive: bool = False,
) -> int:
    """Export a new repository version (of the spec's interactive model with `interactive`)
    and, if Triton is up, load it."""
    from model_registry.inference import InferenceUnavailable, TritonBackend
    from model_registry.repository import model_repository

    if interactive:
        spec = spec.as_interactive()
    name = spec.name
    repository = model_repository(settings)
    version = repository.export(spec, network)
    try:
        TritonBackend(settings.triton.base_url).load(name)
        out.print(f"Triton at {settings.triton.base_url} now serves {name} v{version}")
    except InferenceUnavailable:
        out.print("Triton is not running: the version is served from the next `radloop up`")
    with repository.version_folder(name, version) as folder:
        _adopt(settings, name, folder, version, out)
    return version


def _adopt(settings: Settings, name: str, folder: Path, version: int, out: Console) -> None:
    """Register the version in MLflow as `champion` when MLflow answers (else the first
    retraining does it)."""
    from model_registry.mlflow_registry import Registry, RegistryUnavailable, adopt

    registry = Registry(settings.mlflow.effective_tracking_uri)
    try:
        if not registry.reachable():
            raise RegistryUnavailable("not answering")
        mlflow_version = adopt(registry, name, folder, version, "radloop models CLI")
    except RegistryUnavailable:
        out.print("MLflow is not running: the first retraining registers this version")
        return
    out.print(f"MLflow: {name} version {mlflow_version} (alias champion)")


@models_app.command("bootstrap")
def bootstrap(
    model: str,
    studies: Annotated[int, typer.Option(min=1, help="Phantom studies to train on.")] = 10,
    holdout: Annotated[int, typer.Option(min=1, help="Phantom studies to report Dice on.")] = 3,
    epochs: Annotated[int, typer.Option(min=1)] = 60,
    steps: Annotated[int, typer.Option(min=1, help="Batches per epoch.")] = 8,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    interactive: Annotated[
        bool,
        typer.Option(
            "--interactive",
            help="Train the spec's interactive (click-guided) model instead, for "
            "`interactive.steps` batches with simulated clicks.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a starter model on generated phantoms (minutes on a CPU) and serve it."""
    import torch
    from rich.progress import Progress

    from agents.trainer import TrainingConfig, evaluate, prepare, train
    from radloop.app.phantoms import Phantom, PhantomLabel, generate

    settings = cli_settings()
    spec = _spec(settings, model)
    if interactive and spec.interactive is None:
        err_console.print(f"{model}: its spec declares no interactive model")
        raise typer.Exit(2)
    phantom_labels = {label.name.lower(): label.value for label in PhantomLabel}
    if {label.name.lower(): label.value for label in spec.labels} != phantom_labels:
        err_console.print(
            f"{model}: its labels are not the phantom's ({', '.join(phantom_labels)})"
        )
        raise typer.Exit(2)
    config = TrainingConfig(epochs=epochs, steps_per_epoch=steps, seed=seed)
    out = err_console if as_json else console
    with Progress(console=out, transient=as_json) as progress:
        task = progress.add_task("generating phantoms", total=studies + holdout)
        train_set: list[Phantom] = []
        held: list[Phantom] = []
        for index in range(studies + holdout):
            phantom = generate(seed * 1000 + index)
            (train_set if index < studies else held).append(phantom)
            progress.advance(task)
        if interactive:
            from agents.interactive import InteractiveExample, gate_dice, train_interactive

            total = spec.interactive.steps if spec.interactive else 0
            task = progress.add_task("training with simulated clicks", total=total)

            def on_step(step: int, loss: float) -> None:
                progress.update(task, completed=step, description=f"training (loss {loss:.3f})")

            network, report = train_interactive(
                spec,
                [InteractiveExample(p.hu, p.labels) for p in train_set],
                seed,
                None,
                None,
                on_step,
            )
            dice = gate_dice(network, [(p.hu, p.labels, p.spacing) for p in held], spec)
        else:
            examples = [prepare(p.hu, p.labels, p.spacing, spec) for p in train_set]
            task = progress.add_task("training", total=epochs)

            def on_epoch(epoch: int, loss: float) -> None:
                progress.update(task, completed=epoch, description=f"training (loss {loss:.3f})")

            network, report = train(spec, examples, config, on_epoch=on_epoch)
            dice = evaluate(network, [(p.hu, p.labels, p.spacing) for p in held], spec)
    version = _publish(settings, spec, torch.jit.script(network), out, interactive=interactive)
    result = {
        "name": spec.interactive_name if interactive else spec.name,
        "version": version,
        "trained_on": studies,
        "seed": seed,
        "epochs": epochs,
        "final_loss": report.epoch_losses[-1],
        "holdout_dice": dice,
    }
    if as_json:
        print_json(result)
        return
    scores = ", ".join(f"{name} {score:.2f}" for name, score in dice.items())
    after = (
        f" after {spec.interactive.gate_clicks} clicks per label"
        if spec.interactive and interactive
        else ""
    )
    console.print(
        f"{result['name']} v{version}: Dice on {holdout} held-out phantoms{after}: {scores}"
    )


def _load_weights(spec: ModelSpec, path: Path) -> Any:
    """TorchScript from a file, or from a MONAI bundle folder: `models/model.ts` if the bundle
    has one, else the state dict `models/model.pt` loaded into the spec's network."""
    import torch

    if path.is_dir():
        scripted, state = path / "models" / "model.ts", path / "models" / "model.pt"
        if scripted.is_file():
            path = scripted
        elif state.is_file():
            network = spec.network.build()
            weights = torch.load(state, map_location="cpu", weights_only=True)
            network.load_state_dict(weights.get("model", weights))
            return torch.jit.script(network.eval())
        else:
            raise ValueError("a MONAI bundle needs models/model.ts or models/model.pt")
    return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]


@models_app.command("import")
def import_model(model: str, path: Path) -> None:
    """Add weights a site already has — a TorchScript file or a MONAI bundle folder — as the
    next version of MODEL, after checking them against its spec."""
    import torch

    settings = cli_settings()
    spec = _spec(settings, model)
    try:
        network = _load_weights(spec, path)
    except (RuntimeError, ValueError, OSError, KeyError) as error:
        err_console.print(f"{path}: not usable weights for {model}: {error}")
        raise typer.Exit(2) from None
    probe = torch.zeros((1, 1, *spec.inference.roi_size))
    try:
        with torch.inference_mode():
            shape = tuple(network.eval()(probe).shape)
    except RuntimeError as error:
        err_console.print(f"{path}: does not run on a {spec.inference.roi_size} patch: {error}")
        raise typer.Exit(2) from None
    expected = (1, len(spec.labels) + 1, *spec.inference.roi_size)
    if shape != expected:
        err_console.print(f"{path}: outputs {shape}, the spec needs {expected}")
        raise typer.Exit(2)
    version = _publish(settings, spec, network)
    console.print(f"{spec.name} v{version} imported from {path}")
