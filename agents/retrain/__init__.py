"""Retraining one model: fine-tune the champion on the validated train labels, track the run
in MLflow, judge champion and challenger on the frozen holdout, deploy only past the gate.

What it holds today:

* `retrainer` — `Retrainer`: whether a run is due, and one run as a sequence of named steps;
* `runs` — the `training_runs` rows: the one-run-per-model guard, progress, how a run ends
  (failed, or cancelled on Prefect's cancellation or SIGTERM, its MLflow run closed), and
  `training_record` (a run as the CLI and the flow report it);
* `dataset` — a split's validated label pairs as volumes, and the dataset manifest;
* `gate` — holdout Dice of champion and challenger, and the promotion decision;
* `tracking` — the MLflow run: parameters, dataset manifest, the registered model;
* `card` — the model card stored with each trained model.
"""

from agents.retrain.retrainer import Retrainer
from agents.retrain.runs import STALE_AFTER, TrainingCancelled, sigterm_cancels, training_record

__all__ = ["STALE_AFTER", "Retrainer", "TrainingCancelled", "sigterm_cancels", "training_record"]
