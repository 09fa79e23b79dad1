"""Assisted correction: a reader's clicks on a claimed case refined into a label by the task's
interactive model on Triton, every refinement recorded, and the latest one saved as the
correction on request.

Clicks arrive as MONAI Label's clients send them: per label name (or "background") a list of
voxel indices [i, j, k] of the image as `/datastore/image` serves it — (column, row, slice)
of the series, the NIfTI order 3D Slicer uses. They are kept and sent to Triton as (channel,
slice, row, column), channel 0 background and n the label of value n.

The label a refinement starts from is the reader's previous refinement of the case when the
new clicks extend its clicks (clients resend every click of the session), else the draft.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select

from agents.nifti import read_label_map, voxel_spacing, write_nifti
from agents.review.cases import Conflict, NotFound, Unprocessable, load_case, load_inputs
from agents.review.worklist import Worklist
from agents.volume import LoadedSeries
from model_registry.inference import InferenceResult, InferenceUnavailable
from radloop.db import Annotation, Interaction, Store, utcnow
from radloop.domain import AnnotationState
from radloop.modelspec import ModelSpec

BACKGROUND = "background"


class Refiner(Protocol):
    def refine(
        self,
        model: str,
        image: NDArray[Any],
        spacing: Sequence[float],
        clicks: NDArray[Any],
        previous: NDArray[Any] | None,
        version: int | None = None,
    ) -> InferenceResult: ...


class ServiceUnavailable(Conflict):
    status = 503


@dataclass(frozen=True)
class Refinement:
    interaction_id: int
    labels: NDArray[np.uint8]
    series: LoadedSeries
    model_version: str
    click_count: int


def clicks_from_params(
    params: Mapping[str, Any], spec: ModelSpec, shape: Sequence[int]
) -> NDArray[np.int64]:
    """MONAI Label's click parameters as (channel, slice, row, column) rows; `Unprocessable`
    naming the label and click when one is unknown, malformed or outside the image.

    DeepEdit sends `{<label name>: [[i, j, k], …], "background": [[i, j, k], …]}`; DeepGrow
    sends `foreground`/`background` for the one label named in `label`."""
    interactive = spec.interactive
    if interactive is None:
        raise Unprocessable(f"model {spec.name} has no interactive model")
    channels = {label.name.lower(): label.value for label in spec.labels}
    channels[BACKGROUND] = 0
    points: dict[str, Any] = {}
    for key, value in params.items():
        name = key.lower()
        if name in channels and value is not None:
            points[name] = value
        elif name != "foreground" and _looks_like_clicks(value):
            known = ", ".join([label.name for label in spec.labels] + [BACKGROUND])
            raise Unprocessable(
                f"clicks for unknown label {key!r}; model {spec.name} knows {known}"
            )
    if "foreground" in params:
        target = str(params.get("label") or "").lower()
        if target not in channels or target == BACKGROUND:
            raise Unprocessable(
                f"foreground clicks need `label`, one of {', '.join(sorted(channels))}"
            )
        points[target] = list(points.get(target, [])) + list(params["foreground"] or [])
    columns, rows, slices = shape[2], shape[1], shape[0]
    clicks: list[tuple[int, int, int, int]] = []
    for name, listed in points.items():
        if not isinstance(listed, list):
            raise Unprocessable(f"clicks for {name!r} must be a list of [i, j, k]")
        if len(listed) > interactive.max_clicks:
            raise Unprocessable(
                f"{len(listed)} clicks for {name!r}; at most {interactive.max_clicks} per label"
            )
        for point in listed:
            if (
                not isinstance(point, list)
                or len(point) != 3
                or not all(isinstance(v, int | float) and float(v).is_integer() for v in point)
            ):
                raise Unprocessable(f"click {point!r} for {name!r} is not [i, j, k] voxel indices")
            i, j, k = (int(v) for v in point)
            if not (0 <= i < columns and 0 <= j < rows and 0 <= k < slices):
                raise Unprocessable(
                    f"click [{i}, {j}, {k}] for {name!r} lies outside the image "
                    f"(i < {columns}, j < {rows}, k < {slices})"
                )
            clicks.append((channels[name], k, j, i))
    return np.asarray(clicks, dtype=np.int64).reshape(-1, 4)


def _looks_like_clicks(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], list)
        and len(value[0]) == 3
    )


class Assistant:
    def __init__(
        self,
        store: Store,
        worklist: Worklist,
        refiner: Refiner,
        drafts_dir: Path,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.worklist = worklist
        self.refiner = refiner
        self.drafts_dir = drafts_dir
        self.clock = clock

    def case_for_image(self, series_uid: str) -> int:
        """The case on a series (MONAI Label's image id): the newest open one, else the
        newest."""
        with self.store.read() as session:
            rows = session.execute(
                select(Annotation.id, Annotation.state)
                .where(Annotation.series_uid == series_uid)
                .order_by(Annotation.id.desc())
            ).all()
        if not rows:
            raise NotFound(f"radloop has no case on series {series_uid}")
        open_states = {s.value for s in (AnnotationState.DRAFTED, AnnotationState.CLAIMED)}
        return next((int(i) for i, state in rows if state in open_states), int(rows[0][0]))

    def next_case(self, user: str, strategy: str | None = None) -> dict[str, Any] | None:
        """The drafted case `user` holds (its lease renewed), else the next case the model's
        active-learning strategy (or `strategy`) picks, claimed for them; None when none
        waits."""
        held = self.worklist.items(states=(AnnotationState.CLAIMED,), limit=5000)
        for item in held:
            if item["claimed_by"] == user and item["seg_sop_instance_uid"]:
                return self.worklist.claim(int(item["annotation_id"]), user)
        given = self.worklist.next_cases([user], strategy=strategy)
        return given[0] if given else None

    def inputs(self, annotation_id: int) -> tuple[ModelSpec, LoadedSeries]:
        case_ = load_case(self.store, annotation_id)
        return load_inputs(case_, self.worklist.specs, self.store, self.worklist.spool_dir)

    def draft(self, annotation_id: int) -> NDArray[np.uint8]:
        case_ = load_case(self.store, annotation_id)
        if case_.draft_nifti is None:
            raise Conflict(f"annotation {annotation_id} has no draft")
        return read_label_map(Path(case_.draft_nifti))

    def hold(self, annotation_id: int, user: str) -> None:
        """Claim the case for `user` unless they hold it (a client may refine a case it
        opened from the datastore list); `Conflict` when another reader holds it."""
        case_ = load_case(self.store, annotation_id)
        held = case_.state == AnnotationState.CLAIMED.value and case_.claimed_by == user
        if not held or case_.lease_expires_at is None or case_.lease_expires_at <= self.clock():
            self.worklist.claim(annotation_id, user)

    def refine(self, annotation_id: int, user: str, params: Mapping[str, Any]) -> Refinement:
        """The interactive model's label for the reader's clicks on the case they hold."""
        spec, series = self.inputs(annotation_id)
        if spec.interactive_name is None:
            raise Unprocessable(f"model {spec.name} has no interactive model")
        clicks = clicks_from_params(params, spec, series.array.shape)
        self.hold(annotation_id, user)
        previous = self._previous(annotation_id, user, clicks)
        started = time.monotonic()
        try:
            result = self.refiner.refine(
                spec.interactive_name,
                series.array.astype(np.float32),
                voxel_spacing(series.affine),
                clicks,
                previous,
            )
        except InferenceUnavailable as error:
            raise ServiceUnavailable(f"the interactive model is not available: {error}") from None
        seconds = time.monotonic() - started
        path = self.drafts_dir / series.study_uid / "refinements" / f"{uuid.uuid4().hex}.nii.gz"
        write_nifti(path, result.labels, series.affine)
        with self.store.transaction() as session:
            row = Interaction(
                annotation_id=annotation_id,
                user_name=user,
                model_name=spec.interactive_name,
                model_version=result.model_version,
                clicks=clicks.tolist(),
                click_count=len(clicks),
                label_path=str(path),
                seconds=seconds,
                created_at=self.clock(),
            )
            session.add(row)
            session.flush()
            interaction_id = row.id
        return Refinement(interaction_id, result.labels, series, result.model_version, len(clicks))

    def _latest(self, annotation_id: int, user: str) -> Interaction | None:
        with self.store.read() as session:
            return session.scalars(
                select(Interaction)
                .where(Interaction.annotation_id == annotation_id, Interaction.user_name == user)
                .order_by(Interaction.id.desc())
                .limit(1)
            ).first()

    def _previous(
        self, annotation_id: int, user: str, clicks: NDArray[np.int64]
    ) -> NDArray[np.uint8] | None:
        latest = self._latest(annotation_id, user)
        if latest is not None:
            before = {tuple(click) for click in latest.clicks}
            if before and before <= {tuple(click) for click in clicks.tolist()}:
                return read_label_map(Path(latest.label_path))
        try:
            return self.draft(annotation_id)
        except Conflict:
            return None

    def refined_cases(self, user: str) -> set[int]:
        """The cases `user` holds and has refined with clicks: "Accept refined label"."""
        with self.store.read() as session:
            return set(
                session.scalars(
                    select(Interaction.annotation_id)
                    .join(Annotation, Annotation.id == Interaction.annotation_id)
                    .where(
                        Interaction.user_name == user,
                        Annotation.claimed_by == user,
                        Annotation.state == AnnotationState.CLAIMED.value,
                    )
                    .distinct()
                )
            )

    def accept_refined(self, annotation_id: int, user: str) -> dict[str, Any]:
        """The reader's latest refinement of the case becomes its correction."""
        latest = self._latest(annotation_id, user)
        if latest is None:
            raise Conflict(f"you have not refined annotation {annotation_id} with clicks")
        return self.worklist.correct_with_volume(
            annotation_id, user, Path(latest.label_path).read_bytes()
        )
