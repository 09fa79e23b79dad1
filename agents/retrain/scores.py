"""A model version's Dice on each holdout label, kept in `holdout_scores` so that the gate
scores the champion only on holdout labels it has not seen. The scores of a promoted
challenger are kept under its Triton version (it is the next gate's champion), the champion's
as the gate computes them, and the training worker scores the serving champion ahead of time
between trainings (`score_ahead`): by the time the threshold is reached, the gate usually
evaluates the challenger alone.

A score is keyed on (model, Triton version, label): a holdout label's files never change and a
version's weights never do; a withdrawn candidate's number may be reused, but its scores are
never kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from sqlalchemy import select

from agents.retrain.dataset import load_volumes
from agents.retrain.gate import PerVolume, score_volumes
from radloop.db import HoldoutScore, Label, Store, TrainingRun, insert_ignoring_conflict, utcnow
from radloop.domain import LabelSplit, TrainingState
from radloop.modelspec import ModelSpec
from radloop.objectstore import ObjectStore

if TYPE_CHECKING:
    from model_registry.repository import TritonRepository

log = logging.getLogger(__name__)


class HoldoutScoreBook:
    def __init__(self, store: Store, model: str) -> None:
        self.store = store
        self.model = model

    def known(self, version: int, label_ids: Iterable[int]) -> PerVolume:
        """The kept scores of `version` on these labels."""
        with self.store.read() as session:
            rows = session.scalars(
                select(HoldoutScore).where(
                    HoldoutScore.model_name == self.model,
                    HoldoutScore.triton_version == version,
                    HoldoutScore.label_id.in_(list(label_ids)),
                )
            )
            return {row.label_id: dict(row.dice) for row in rows}

    def keep(self, version: int, scores: PerVolume) -> None:
        """Keep `scores` of `version` (a score kept before stays as it was)."""
        if not scores:
            return
        with self.store.transaction() as session:
            for label_id, dice in scores.items():
                values = {
                    "model_name": self.model,
                    "triton_version": version,
                    "label_id": label_id,
                    "dice": dice,
                    "created_at": utcnow(),
                }
                insert_ignoring_conflict(session, HoldoutScore.__table__, values)


def score_ahead(
    store: Store, spec: ModelSpec, repository: TritonRepository, datasets: ObjectStore
) -> int:
    """Score the serving champion on the holdout labels it has no kept score for, unless a
    training of the model is running (it needs the machine); returns how many were scored."""
    with store.read() as session:
        training = session.scalar(
            select(TrainingRun.id).where(
                TrainingRun.model_name == spec.name,
                TrainingRun.state == TrainingState.RUNNING.value,
            )
        )
        holdout = set(
            session.scalars(
                select(Label.id).where(
                    Label.model_name == spec.name, Label.split == LabelSplit.HOLDOUT.value
                )
            )
        )
    # The database first: this runs every few seconds, the repository may be a bucket.
    version = None if training or not holdout else repository.champion(spec.name)
    if version is None:
        return 0
    book = HoldoutScoreBook(store, spec.name)
    missing = holdout - set(book.known(version, holdout))
    if not missing:
        return 0
    volumes = load_volumes(store, datasets, spec.name, LabelSplit.HOLDOUT, only=missing)
    with repository.version_folder(spec.name, version) as folder:
        network = torch.jit.load(str(folder / "model.pt"), map_location="cpu")  # type: ignore[no-untyped-call]
    book.keep(version, score_volumes(network.eval(), volumes, spec))
    log.info("%s v%d scored ahead on %d holdout labels", spec.name, version, len(volumes))
    return len(volumes)
