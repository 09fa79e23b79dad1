"""Dashboard plots as SVG, drawn on the server with matplotlib (no pyplot: thread-safe)."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import NDArray
from sqlalchemy import select

from agents.metrics import dice_per_label, mean_dice
from agents.nifti import read_label_map
from radloop.db import Annotation, Interaction, Store, TrainingRun
from radloop.modelspec import ModelSpec

Specs = Mapping[str, ModelSpec]
# Cases the click curves read label files of: the newest corrected ones with refinements.
CLICK_CASES = 30


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    # Text stays text: smaller, selectable, and readable by a screen reader or a test.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    return buffer.getvalue()


def _figure(title: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(6.4, 3.2))
    axes: Axes = figure.subplots()
    axes.set_title(title, fontsize=11)
    axes.grid(alpha=0.3)
    return figure, axes


def _times(values: list[datetime]) -> NDArray[np.datetime64]:
    """UTC datetimes as numpy datetime64 (what matplotlib's date axis takes, typed)."""
    return np.array([v.replace(tzinfo=None) for v in values], dtype="datetime64[s]")


def _empty(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)


def validated_over_time(store: Store, specs: Specs) -> str:
    """Cumulative validated labels per model."""
    with store.read() as session:
        rows = session.execute(
            select(Annotation.model_name, Annotation.validated_at)
            .where(Annotation.validated_at.is_not(None))
            .order_by(Annotation.validated_at)
        ).all()
    figure, axes = _figure("Validated labels over time")
    per_model: dict[str, list[datetime]] = defaultdict(list)
    for model, at in rows:
        if at is not None:
            per_model[model].append(at)
    for model, times in per_model.items():
        axes.step(_times(times), np.arange(1, len(times) + 1), where="post", label=model)
    if per_model:
        axes.legend(fontsize=8)
        figure.autofmt_xdate()
    else:
        _empty(axes, "no validated labels yet")
    axes.set_ylabel("labels")
    return _svg(figure)


def queue_depth(store: Store, specs: Specs) -> str:
    """Cases waiting for a reader over time: +1 when drafted or queued, -1 when corrected."""
    with store.read() as session:
        rows = session.execute(
            select(Annotation.created_at, Annotation.corrected_at, Annotation.validated_at).where(
                Annotation.state != "not_applicable"
            )
        ).all()
    changes: list[tuple[datetime, int]] = []
    for created, corrected, validated in rows:
        changes.append((created, 1))
        closed = corrected or validated
        if closed is not None:
            changes.append((closed, -1))
    changes.sort()
    figure, axes = _figure("Queue depth (cases waiting for a reader)")
    if changes:
        depth, times, values = 0, [], []
        for at, delta in changes:
            depth += delta
            times.append(at)
            values.append(depth)
        axes.step(_times(times), values, where="post", color="tab:orange")
        figure.autofmt_xdate()
    else:
        _empty(axes, "nothing drafted yet")
    axes.set_ylabel("open cases")
    return _svg(figure)


def correction_effort(store: Store, specs: Specs) -> str:
    """1 - Dice(draft, correction) per model version: lower means the model needed less fixing."""
    with store.read() as session:
        rows = session.execute(
            select(Annotation.model_name, Annotation.model_version, Annotation.correction_dice)
            .where(Annotation.correction_dice.is_not(None))
            .order_by(Annotation.model_name, Annotation.model_version)
        ).all()
    per_version: dict[str, list[float]] = defaultdict(list)
    for model, version, dice in rows:
        if dice is not None:
            per_version[f"{model} v{version or '–'}"].append(1.0 - dice)
    figure, axes = _figure("Correction effort per model version (1 − Dice)")
    if per_version:
        names = sorted(per_version)
        axes.boxplot([per_version[n] for n in names], tick_labels=names)
        axes.set_ylim(0, 1)
    else:
        _empty(axes, "no corrections yet")
    axes.set_ylabel("1 − Dice")
    return _svg(figure)


def click_curves(store: Store, specs: Specs) -> str:
    """Dice of each click-guided refinement to the label the reader saved, by the clicks it
    took (0: the draft): the readers' own version of bench/interactive.py's curve, over the
    newest `CLICK_CASES` corrected cases that were refined."""
    with store.read() as session:
        cases = session.execute(
            select(
                Annotation.id,
                Annotation.model_name,
                Annotation.correction_path,
                Annotation.correction_dice,
            )
            .where(
                Annotation.correction_path.is_not(None),
                Annotation.id.in_(select(Interaction.annotation_id)),
            )
            .order_by(Annotation.corrected_at.desc())
            .limit(CLICK_CASES)
        ).all()
        refinements = session.execute(
            select(Interaction.annotation_id, Interaction.click_count, Interaction.label_path)
            .where(Interaction.annotation_id.in_([case.id for case in cases]))
            .order_by(Interaction.id)
        ).all()
    figure, axes = _figure("Dice to the saved label after n clicks (readers' refinements)")
    per_clicks: dict[int, list[float]] = defaultdict(list)
    for case in cases:
        spec = specs.get(case.model_name)
        try:
            final = read_label_map(Path(case.correction_path))
        except OSError:  # a label file removed by hand: the case is left out
            continue
        # 0 clicks: the draft, whose Dice to the saved label the intake recorded.
        points: list[tuple[int, float]] = []
        if case.correction_dice is not None:
            points.append((0, float(case.correction_dice)))
        for annotation_id, clicks, path in refinements:
            if annotation_id != case.id or spec is None:
                continue
            try:
                refined = read_label_map(Path(path))
            except OSError:
                continue
            points.append((clicks, mean_dice(dice_per_label(refined, final, spec))))
        if len(points) > 1:
            clicks_, dice = zip(*sorted(points), strict=True)
            axes.plot(clicks_, dice, color="0.7", linewidth=0.8, marker=".")
            for n, value in points:
                per_clicks[n].append(value)
    if per_clicks:
        counts = sorted(per_clicks)
        medians = [float(np.median(per_clicks[n])) for n in counts]
        axes.plot(counts, medians, color="tab:blue", linewidth=2, label="median")
        axes.legend(fontsize=8)
        axes.set_ylim(0, 1.02)
    else:
        _empty(axes, "no refined corrections yet")
    axes.set_xlabel("clicks (all labels)")
    axes.set_ylabel("mean Dice to the saved label")
    return _svg(figure)


def holdout_by_labels(store: Store, specs: Specs) -> str:
    """What the order bought: each judged training run's holdout Dice (mean of labels) against
    the validated train labels it had, per model, promoted versions filled; each point names
    the strategies that picked its labels."""
    with store.read() as session:
        rows = session.execute(
            select(
                TrainingRun.model_name,
                TrainingRun.label_ids,
                TrainingRun.challenger_dice,
                TrainingRun.state,
                TrainingRun.strategies,
            )
            .where(TrainingRun.challenger_dice.is_not(None))
            .order_by(TrainingRun.id)
        ).all()
    figure, axes = _figure("What the order bought: holdout Dice by validated labels")
    per_model: dict[str, list[tuple[int, float, bool, str]]] = defaultdict(list)
    for model, label_ids, dice, state, strategies in rows:
        picked = ", ".join(f"{k} {n}" for k, n in (strategies or {}).items())
        mean = float(np.mean(list(dice.values()))) if dice else 0.0
        per_model[model].append((len(label_ids or []), mean, state == "promoted", picked))
    for model, points in per_model.items():
        labels = [p[0] for p in points]
        line = axes.plot(labels, [p[1] for p in points], alpha=0.5, label=model)[0]
        for count, mean, promoted, picked in points:
            face = line.get_color() if promoted else "white"
            axes.plot(count, mean, "o", color=line.get_color(), markerfacecolor=face)
            if picked:
                axes.annotate(
                    picked, (count, mean), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
    if per_model:
        axes.legend(fontsize=8, title="filled: promoted", title_fontsize=7)
    else:
        _empty(axes, "no training run judged yet")
    axes.set_xlabel("validated train labels")
    axes.set_ylabel("holdout Dice")
    return _svg(figure)


PLOTS: dict[str, Callable[[Store, Specs], str]] = {
    "validated": validated_over_time,
    "queue": queue_depth,
    "effort": correction_effort,
    "clicks": click_curves,
    "labels": holdout_by_labels,
}
