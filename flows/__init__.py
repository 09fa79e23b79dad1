"""Prefect flows: thin sequences of idempotent calls into agents and the registry.

* `annotate` — the `annotate-study` background task: draft a completed study revision with one
  model, run by warm `radloop worker` processes; `submit_annotation` submits it.
* `retrain` — `retrain-model`: retrain a model on its validated labels, gate, deploy.
* `process` — each flow run marks itself with its host and process, so a sweep can tell a
  run whose process died from one still running.
* `ghosts` — the sweep the training worker runs: ends runs a stop or crash left behind and
  frees their concurrency slots.
"""
