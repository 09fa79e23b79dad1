"""The worklist's order: urgent cases first, then each model's open cases as its active-learning
strategy ranks them (`agents.selection`), cases without a draft last.

A model's strategy and seed are the spec's `active_learning` until an admin sets others
(`model_settings`); the order is computed from what each draft carries (its scores and
embedding) whenever the worklist is read, so a new strategy re-orders the open queue at once.
The cases a diversity-aware strategy measures against ("covered") are the model's cases in a
reader's hands or already corrected or validated.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from agents.review.cases import NotFound, Unprocessable
from agents.selection import URGENT, Candidate, embedding_array, strategy
from radloop.db import Annotation, ModelSetting, Selection, Store
from radloop.domain import AnnotationState
from radloop.modelspec import ModelSpec, SelectionStrategy

log = logging.getLogger(__name__)

_RANKED = (AnnotationState.QUEUED.value, AnnotationState.DRAFTED.value)
_COVERED = (
    AnnotationState.CLAIMED.value,
    AnnotationState.CORRECTED.value,
    AnnotationState.VALIDATED.value,
)


@dataclass(frozen=True)
class Ranked:
    """Where one open case stands: its position in the worklist (1 first), the strategy that
    put it there ("urgent" for a case a reviewer marked), the seed, and the strategy's value."""

    position: int
    strategy: str
    seed: int
    value: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.position,
            "strategy": self.strategy,
            "seed": self.seed,
            "value": self.value,
        }


@dataclass(frozen=True)
class ModelStrategy:
    strategy: str
    seed: int
    changed_by: str | None = None
    changed_at: datetime | None = None


class QueueOrder:
    def __init__(self, store: Store, specs: Mapping[str, ModelSpec]) -> None:
        self.store = store
        self.specs = specs

    # -- the per-model setting ---------------------------------------------------------

    def setting(self, session: Session, model: str) -> ModelStrategy:
        row = session.get(ModelSetting, model)
        if row is not None:
            return ModelStrategy(row.strategy, row.seed, row.changed_by, row.changed_at)
        spec = self.specs.get(model)
        if spec is None:
            return ModelStrategy(SelectionStrategy.RANDOM.value, 0)
        return ModelStrategy(spec.active_learning.strategy.value, spec.active_learning.seed)

    def settings(self) -> dict[str, ModelStrategy]:
        with self.store.read() as session:
            return {name: self.setting(session, name) for name in sorted(self.specs)}

    def set_strategy(
        self, model: str, name: str, seed: int | None, user: str, now: datetime
    ) -> ModelStrategy:
        """Make `name` the model's strategy (refused, saying why, for an unknown model or
        strategy, or one whose score the model's drafts do not carry)."""
        spec = self.specs.get(model)
        if spec is None:
            raise NotFound(f"no model {model}")
        try:
            chosen = SelectionStrategy(name)
            spec.check_strategy(chosen)
        except ValueError as error:
            raise Unprocessable(str(error)) from None
        with self.store.transaction() as session:
            row = session.get(ModelSetting, model)
            if row is None:
                row = ModelSetting(model_name=model, seed=spec.active_learning.seed)
                session.add(row)
            row.strategy = chosen.value
            row.seed = row.seed if seed is None else seed
            row.changed_by = user
            row.changed_at = now
            result = ModelStrategy(row.strategy, row.seed, user, now)
        log.info("model %s: strategy %s, seed %d, set by %s", model, chosen, result.seed, user)
        return result

    # -- ranking -------------------------------------------------------------------------

    def rank(
        self, session: Session, viewable_only: bool = False, override: str | None = None
    ) -> dict[int, Ranked]:
        """Every queued or drafted case's place in the worklist, by annotation id; with
        `override`, as that strategy (with each model's seed) would place them."""
        query = select(Annotation).where(Annotation.state.in_(_RANKED))
        if viewable_only:
            query = query.where(
                Annotation.viewable_at.is_not(None), Annotation.series_uid.is_not(None)
            )
        cases = list(session.scalars(query))
        urgent = sorted((a for a in cases if a.urgent), key=lambda a: (a.created_at, a.id))
        drafted: dict[str, list[Annotation]] = {}
        draftless = []
        for annotation in cases:
            if annotation.urgent:
                continue
            if annotation.seg_sop_instance_uid is None:
                draftless.append(annotation)
            else:
                drafted.setdefault(annotation.model_name, []).append(annotation)
        order: list[tuple[int, Ranked]] = [(a.id, Ranked(0, URGENT, 0, None)) for a in urgent]
        per_model = [
            self._rank_model(session, model, found, override)
            for model, found in sorted(drafted.items())
        ]
        # Models take turns: the first of each, then the second of each, ...
        for turn in itertools.zip_longest(*per_model):
            order.extend(entry for entry in turn if entry is not None)
        for annotation in sorted(draftless, key=lambda a: (a.created_at, a.id)):
            setting = self.setting(session, annotation.model_name)
            order.append((annotation.id, Ranked(0, setting.strategy, setting.seed, None)))
        return {
            key: Ranked(position, ranked.strategy, ranked.seed, ranked.value)
            for position, (key, ranked) in enumerate(order, start=1)
        }

    def _rank_model(
        self, session: Session, model: str, cases: Sequence[Annotation], override: str | None
    ) -> list[tuple[int, Ranked]]:
        setting = self.setting(session, model)
        if override is not None:
            setting = ModelStrategy(override, setting.seed)
        chosen = strategy(setting.strategy)
        candidates = [Candidate(a.id, a.scores or {}, embedding_array(a.embedding)) for a in cases]
        covered = self._covered(session, model)
        picks = chosen.rank(candidates, covered, len(candidates), setting.seed)
        return [(p.key, Ranked(0, setting.strategy, setting.seed, p.value)) for p in picks]

    def _covered(self, session: Session, model: str) -> Any:
        rows = session.scalars(
            select(Annotation.embedding).where(
                Annotation.model_name == model,
                Annotation.state.in_(_COVERED),
                Annotation.embedding.is_not(None),
            )
        )
        vectors = [v for v in (embedding_array(row) for row in rows) if v is not None]
        widths = {len(v) for v in vectors}
        if not vectors or len(widths) != 1:
            return np.zeros((0, 0))
        return np.stack(vectors)

    # -- what was handed out -------------------------------------------------------------

    @staticmethod
    def record(
        session: Session,
        annotation: Annotation,
        user: str,
        ranked: Ranked | None,
        batch: str,
        now: datetime,
    ) -> None:
        """Write the selection of `annotation` for `user` (in the claim's transaction)."""
        session.add(
            Selection(
                annotation_id=annotation.id,
                model_name=annotation.model_name,
                model_version=annotation.model_version,
                user_name=user,
                strategy=URGENT if annotation.urgent else (ranked.strategy if ranked else "-"),
                seed=ranked.seed if ranked else 0,
                value=None if annotation.urgent or ranked is None else ranked.value,
                scores=annotation.scores,
                rank=ranked.position if ranked else 0,
                batch=batch,
                created_at=now,
            )
        )
