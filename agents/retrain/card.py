"""The model card: the README stored beside each trained model in MLflow, saying what it
segments, how it was trained and how it scored on the holdout."""

from __future__ import annotations

import json
from typing import Any

from agents.retrain.gate import HoldoutScores
from radloop.modelspec import ModelSpec


def model_card(
    spec: ModelSpec, params: dict[str, Any], losses: list[float], scores: HoldoutScores
) -> str:
    """Markdown: labels and input, training parameters and final loss, holdout Dice beside the
    champion's at training time."""
    lines = [
        f"# {spec.name}",
        "",
        spec.description or "radloop segmentation model.",
        "",
        f"Labels: {', '.join(label.name for label in spec.labels)}; input {spec.input.modality}, "
        f"spacing {spec.preprocessing.spacing} mm, window {spec.preprocessing.window.min}.."
        f"{spec.preprocessing.window.max}.",
        "",
        "## Training",
        "",
        "```json",
        json.dumps(params, indent=2),
        "```",
        "",
        f"Final training loss: {losses[-1]:.4f} after {len(losses)} epochs.",
        "",
        "## Holdout Dice (frozen holdout, never trained on)",
        "",
        "| label | this version | champion at training time |",
        "| --- | --- | --- |",
    ]
    for name, score in scores.challenger.items():
        before = f"{scores.champion[name]:.4f}" if scores.champion else "—"
        lines.append(f"| {name} | {score:.4f} | {before} |")
    lines += ["", "Trained on validated corrections by radloop; no patient data in this run."]
    return "\n".join(lines) + "\n"
