"""`Retrainer`: when one model is due for retraining, and one run as a sequence of named
steps — load the dataset, load the champion, open the MLflow run, train, stage the challenger
in Triton (it loads while the next steps run), judge on the holdout, register, decide, then
promote or withdraw the staged version, close."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agents.interactive import InteractiveExample, fine_tune
from agents.retrain import tracking
from agents.retrain.card import model_card
from agents.retrain.dataset import Volume, load_volumes, manifest, train_labels_since
from agents.retrain.gate import HoldoutScores, decide, judge
from agents.retrain.recovery import close_abandoned_mlflow_runs, finish_interrupted_deploy
from agents.retrain.runs import (
    RunBook,
    record_deploy,
    selected_by,
    sigterm_cancels,
    training_record,
)
from agents.retrain.scores import HoldoutScoreBook
from agents.trainer import TrainingConfig, prepare, train, trainable
from model_registry.deploy import StagedVersion, hot_reload
from model_registry.inference import TritonBackend
from model_registry.mlflow_registry import CHAMPION, Registry, adopt
from model_registry.repository import TritonRepository, model_repository
from radloop.db import Store, utcnow
from radloop.domain import LabelSplit, TrainingState, TrainingTrigger
from radloop.events import EventType, ModelEvent, record_event
from radloop.modelspec import ModelSpec
from radloop.objectstore import LocalFolder, ObjectStore
from radloop.settings import Settings

log = logging.getLogger(__name__)

EpochHook = Callable[[int, float], None]


@dataclass
class _Run:
    """One run as its steps hand it on: its row, its MLflow run, seconds per phase."""

    id: int
    reason: str
    mlflow_run_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


@contextmanager
def _timed(run: _Run, phase: str) -> Iterator[None]:
    mark = time.monotonic()
    yield
    run.timings[phase] = time.monotonic() - mark


class Retrainer:
    def __init__(
        self,
        store: Store,
        spec: ModelSpec,
        registry: Registry,
        repository: TritonRepository,
        backend: TritonBackend | None,
        datasets: ObjectStore | None = None,
    ) -> None:
        self.store = store
        self.spec = spec
        self.registry = registry
        self.repository = repository
        self.backend = backend
        # Where validated pairs are (their rows name them); None: this host's filesystem.
        self.datasets = datasets or LocalFolder(Path("/"))
        self.book = RunBook(store, spec.name)
        self.scores = HoldoutScoreBook(store, spec.name)

    @classmethod
    def from_settings(cls, store: Store, spec: ModelSpec, settings: Settings) -> Retrainer:
        """Against the configured MLflow, model repository and Triton."""
        return cls(
            store,
            spec,
            Registry(settings.mlflow.effective_tracking_uri),
            model_repository(settings),
            TritonBackend(settings.triton.base_url, settings.triton.timeout_seconds),
            settings.shared_store("datasets"),
        )

    # -- when -------------------------------------------------------------------------

    def new_train_labels(self) -> int:
        """Validated train labels since the start of the last run that trained."""
        return train_labels_since(self.store, self.spec.task, self.book.last_training_start())

    def due(self, trigger: TrainingTrigger | str) -> str | None:
        """Why a run should start now, or None."""
        trigger = TrainingTrigger(trigger)
        fresh = self.new_train_labels()
        if trigger == TrainingTrigger.THRESHOLD and fresh >= self.spec.retraining.threshold:
            return f"{fresh} new train labels >= threshold {self.spec.retraining.threshold}"
        if trigger == TrainingTrigger.SCHEDULE and fresh > 0:
            return f"scheduled, {fresh} new train labels"
        if trigger == TrainingTrigger.MANUAL:
            return f"requested by hand ({fresh} new train labels)"
        return None

    # -- one run ----------------------------------------------------------------------

    def start(self, trigger: TrainingTrigger | str) -> int | None:
        """Open a training run row, or None when one of this model is already running."""
        return self.book.open(TrainingTrigger(trigger), self.spec.retraining.epochs)

    def run(
        self, trigger: TrainingTrigger | str, on_epoch: EpochHook | None = None
    ) -> dict[str, Any]:
        """Train, register, gate and (if promoted) deploy; returns the run's record. A run
        that raises ends failed, or cancelled when cancelled or terminated (Prefect's
        cancellation, SIGTERM, Ctrl-C), and the exception goes on (`RunBook.end`)."""
        trigger = TrainingTrigger(trigger)
        reason = self.due(trigger)
        if reason is None:
            return {"state": TrainingState.SKIPPED.value, "decision": "not due: no new labels"}
        with sigterm_cancels():
            run_id = self.start(trigger)
            if run_id is None:
                return {
                    "state": TrainingState.SKIPPED.value,
                    "decision": "a run is already training",
                }
            try:
                self._run(_Run(run_id, reason), on_epoch)
            except BaseException as error:  # Prefect cancels with a BaseException
                self.book.end(run_id, error, self.registry)
                raise
        return self.record(run_id)

    def record(self, run_id: int) -> dict[str, Any]:
        return training_record(self.store, run_id)

    def _run(self, run: _Run, on_epoch: EpochHook | None) -> None:
        """One run's steps, in order; the row is decided at the end."""
        train_set, holdout = self._dataset()
        parent, champion = self._champion()
        self.book.update(
            run.id,
            label_ids=[v.label_id for v in train_set],
            holdout_label_ids=[v.label_id for v in holdout],
            parent_version=parent,
        )
        examples: list[Any] = (
            [InteractiveExample(v.hu, v.labels) for v in train_set]
            if self.spec.is_interactive
            else [prepare(v.hu, v.labels, v.spacing, self.spec) for v in train_set]
        )
        run.timings["prepare_s"] = time.monotonic() - run.started
        params = self._open_mlflow_run(run, train_set, holdout, parent)
        with _timed(run, "train_s"):
            challenger, losses = self._train(run, examples, champion, on_epoch)
        with _timed(run, "stage_s"):
            scripted: torch.jit.ScriptModule = torch.jit.script(challenger)
            staged = self._stage(scripted, has_champion=champion is not None)
        try:
            with _timed(run, "evaluate_s"):
                scores = self._judge(run, challenger, (parent, champion), holdout)
            with _timed(run, "register_s"):
                card = model_card(self.spec, params, losses, scores)
                version = self._register(run, scripted, card, scores)
            promote = self._decide(run, version, parent, scores, has_champion=champion is not None)
            triton_version = None
            if promote:
                with _timed(run, "deploy_s"):
                    triton_version = self._deploy(run, scripted, staged, version, parent, scores)
                # The next gate's champion: its holdout scores are known.
                self.scores.keep(triton_version, scores.challenger_per_volume)
            elif staged is not None:
                with _timed(run, "withdraw_s"):
                    staged.withdraw()
        except BaseException:
            if staged is not None:  # not judged, or its deploy failed: it must not stay
                staged.withdraw_quietly()
            raise
        run.timings["total_s"] = time.monotonic() - run.started
        # The row first: once decided, an interruption (`RunBook.end`) leaves it decided.
        self.book.finish(
            run.id,
            TrainingState.PROMOTED if promote else TrainingState.REJECTED,
            triton_version=triton_version,
            timings=run.timings,
        )
        self.registry.client.set_terminated(run.mlflow_run_id)

    # -- the steps ----------------------------------------------------------------------

    def _dataset(self) -> tuple[list[Volume], list[Volume]]:
        """The validated train and holdout volumes; training needs at least one train label."""
        task = self.spec.task  # an interactive model learns from its task's labels
        train_set = load_volumes(self.store, self.datasets, task, LabelSplit.TRAIN)
        holdout = load_volumes(self.store, self.datasets, task, LabelSplit.HOLDOUT)
        if not train_set:
            raise RuntimeError("no validated train labels")
        return train_set, holdout

    def _champion(self) -> tuple[int | None, torch.nn.Module | None]:
        """The served champion's Triton version and network (None, None on a cold start). A
        starter or imported champion is given its MLflow version first ("adopted"); what a
        killed run left is set right before (`agents.retrain.recovery`)."""
        name = self.spec.name
        finish_interrupted_deploy(self.store, self.registry, self.repository, name)
        close_abandoned_mlflow_runs(self.store, self.registry, name)
        parent = self.repository.champion(name)
        if parent is None:
            return None, None
        with self.repository.version_folder(self.spec.name, parent) as folder:
            champion: torch.nn.Module = torch.jit.load(str(folder / "model.pt"), map_location="cpu")  # type: ignore[no-untyped-call]
            adopt(
                self.registry,
                self.spec.name,
                folder,
                parent,
                "served before radloop trained it (starter or imported)",
            )
        return parent, champion.eval()

    def _open_mlflow_run(
        self, run: _Run, train_set: list[Volume], holdout: list[Volume], parent: int | None
    ) -> dict[str, Any]:
        """The MLflow run, its parameters and dataset manifest; returns the parameters."""
        run.mlflow_run_id = tracking.create_run(self.registry, self.spec, run.id, run.reason)
        picked = selected_by(self.store, [v.label_id for v in train_set])
        self.book.update(run.id, mlflow_run_id=run.mlflow_run_id, strategies=picked)
        params = tracking.training_params(self.spec, len(train_set), len(holdout), parent, picked)
        dataset = manifest(self.store, self.spec.task, train_set, holdout)
        tracking.log_inputs(self.registry, run.mlflow_run_id, params, dataset)
        return params

    def _train(
        self,
        run: _Run,
        examples: list[Any],
        champion: torch.nn.Module | None,
        on_epoch: EpochHook | None,
    ) -> tuple[torch.nn.Module, list[float]]:
        """Fine-tune the champion (or train afresh); each epoch logs its loss and beats the
        row's heartbeat. Returns the challenger and the loss per epoch."""
        retraining = self.spec.retraining
        config = TrainingConfig(
            epochs=retraining.epochs,
            steps_per_epoch=retraining.steps_per_epoch,
            batch_size=retraining.batch_size,
            learning_rate=retraining.learning_rate,
            seed=retraining.seed,
        )

        def epoch_done(epoch: int, loss: float) -> None:
            self.registry.client.log_metric(run.mlflow_run_id, "train_loss", loss, step=epoch)
            self.book.update(run.id, epoch=epoch, loss=loss, heartbeat_at=utcnow())
            if on_epoch is not None:
                on_epoch(epoch, loss)

        initial = trainable(self.spec, champion)
        if self.spec.is_interactive:  # the same budget, in batches with simulated clicks
            return fine_tune(self.spec, examples, config, initial, epoch_done)
        challenger, report = train(self.spec, examples, config, initial, on_epoch=epoch_done)
        return challenger, report.epoch_losses

    def _judge(
        self,
        run: _Run,
        challenger: torch.nn.Module,
        champion: tuple[int | None, torch.nn.Module | None],
        holdout: list[Volume],
    ) -> HoldoutScores:
        """Both on the frozen holdout (the champion where no score is kept), logged to MLflow."""
        parent, network = champion
        ids = [v.label_id for v in holdout]
        known = self.scores.known(parent, ids) if parent is not None else {}
        scores = judge(challenger, network, holdout, self.spec, known)
        if parent is not None:
            self.scores.keep(parent, scores.champion_computed)
        log.info("%s: champion scores known for %d of %d", self.spec.name, len(known), len(ids))
        client = self.registry.client
        for name, score in scores.challenger.items():
            client.log_metric(run.mlflow_run_id, f"holdout_dice_{name}", score)
        for name, score in (scores.champion or {}).items():
            client.log_metric(run.mlflow_run_id, f"champion_holdout_dice_{name}", score)
        return scores

    def _stage(
        self, scripted: torch.jit.ScriptModule, *, has_champion: bool
    ) -> StagedVersion | None:
        """The challenger as the next Triton version, loading beside the champion while it is
        judged (drafts keep asking for the champion). None without a Triton, or on a cold
        start (nothing serves yet, so there is nothing to overlap with; it deploys after)."""
        if self.backend is None or not has_champion:
            return None
        return StagedVersion(self.repository, self.backend, self.spec, scripted)

    def _register(
        self, run: _Run, scripted: torch.jit.ScriptModule, card: str, scores: HoldoutScores
    ) -> str:
        """The model as the run's artifact, a new MLflow version aliased challenger."""
        return tracking.register_model(
            self.registry,
            self.spec,
            run.mlflow_run_id,
            run.id,
            scripted,
            card,
            scores.challenger_mean,
        )

    def _decide(
        self,
        run: _Run,
        version: str,
        parent: int | None,
        scores: HoldoutScores,
        *,
        has_champion: bool,
    ) -> bool:
        """The gate's decision, recorded on the champion's and the run's MLflow entries, the
        row and the model.registered event. Returns whether to promote."""
        name, client = self.spec.name, self.registry.client
        champion_mean = scores.champion_mean
        if champion_mean is not None and parent is not None:
            registered = self.registry.by_triton_version(name, parent)
            if registered is not None:  # the champion's score on today's holdout
                self.registry.tag(name, registered.version, "holdout_dice", f"{champion_mean:.4f}")
        promote, decision = decide(has_champion, scores, self.spec.retraining.gate_margin)
        client.set_tag(run.mlflow_run_id, "radloop.decision", decision)
        client.log_metric(run.mlflow_run_id, "promoted", 1.0 if promote else 0.0)
        with self.store.transaction() as session:
            record_event(
                session,
                ModelEvent(
                    kind=EventType.MODEL_REGISTERED,
                    model=name,
                    training_run_id=run.id,
                    mlflow_version=version,
                    holdout_dice=scores.challenger_mean,
                ),
            )
        self.book.update(
            run.id,
            mlflow_version=version,
            champion_dice=scores.champion,
            challenger_dice=scores.challenger,
            decision=decision,
        )
        log.info("%s run %d: %s", name, run.id, decision)
        return promote

    def _deploy(
        self,
        run: _Run,
        scripted: torch.jit.ScriptModule,
        staged: StagedVersion | None,
        version: str,
        parent: int | None,
        scores: HoldoutScores,
    ) -> int:
        """Serve the challenger: the staged version promoted, else exported as the next Triton
        version and hot-reloaded (or the repository just pointed at it without a Triton);
        alias champion; events model.promoted and model.deployed."""
        name = self.spec.name
        if staged is not None:
            deployment = staged.promote(training_run=run.id)
            triton_version = deployment.version
            run.timings["triton_load_s"] = deployment.load_seconds + deployment.warmup_seconds
        else:
            triton_version = self.repository.export(self.spec, scripted, serve=False)
            if self.backend is not None:
                hot_reload(
                    self.repository, self.backend, self.spec, triton_version, training_run=run.id
                )
            else:
                self.repository.write_config(name, [triton_version])
                self.repository.set_champion(name, triton_version, training_run=run.id)
        self.registry.tag(name, version, "triton_version", triton_version)
        self.registry.set_alias(name, CHAMPION, version)
        with self.store.transaction() as session:
            record_deploy(
                session, name, run.id, version, triton_version, parent, scores.challenger_mean
            )
        return triton_version
