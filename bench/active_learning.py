"""Label efficiency (issue 13): does a strategy's order reach the Dice `random` reaches with
fewer labels, on a heterogeneous pool?

A simulated reader labels what each strategy (`agents.selection`) picks, on the pool
`radloop demo data --pool` writes (common phantoms plus rarer sub-populations; the strategies
never see which). Per seed:

1. `--initial` pool studies, drawn with the seed, are labelled; a model is trained on them from
   scratch as `radloop models bootstrap` does (`--bootstrap-epochs` × the spec's steps);
2. each round, the current model drafts every unlabelled pool study (`analyse`, the code Triton
   runs: scores and embedding), the strategy picks `--batch` of them together (the covered
   cases are the labelled ones, with the embedding of their draft), the reader's labels are the
   truth, and the model is fine-tuned from itself on every label so far exactly as the
   retraining flow does (`agents.trainer.train`, the spec's `retraining` settings);
3. after each round, Dice per label on a fixed holdout with every sub-population in it, and per
   sub-population.

Every strategy of a seed starts from the same labelled studies and the same model. `random` is
the peer. Results go to a JSON file per (seed, strategy) as they finish (`--resume` skips
those), then to `--json-out`, a table and `--plot`.

    python bench/active_learning.py --json-out bench/results/active_learning.json \
        --plot docs/img/active-learning.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from annotate import machine
from numpy.typing import NDArray

from agents.selection import Candidate, strategy
from agents.trainer import Example, TrainingConfig, dice_per_volume, prepare, train, trainable
from model_registry.repository import inference_config
from model_registry.triton_model.drafting import Analysis, analyse
from radloop.app.phantoms import generate
from radloop.app.phantoms.pool import SUBPOPULATIONS, subpopulation_of
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec

TARGET_RATIO = 0.7  # labels to reach random's final Dice, as a share of random's


@dataclass
class Study:
    seed: int
    subpopulation: str
    hu: NDArray[Any]
    labels: NDArray[Any]
    spacing: tuple[float, float, float]
    example: Example


def load_study(seed: int, spec: ModelSpec) -> Study:
    phantom = generate(seed, pool=True)
    hu = phantom.hu.astype(np.float32)
    return Study(
        seed,
        phantom.parameters.subpopulation,
        hu,
        phantom.labels,
        phantom.spacing,
        prepare(hu, phantom.labels, phantom.spacing, spec),
    )


def holdout_seeds(count: int, start: int) -> list[int]:
    """`count` pool seeds from `start` on, the sub-populations taking turns (each present)."""
    wanted = [name for _, name in zip(range(count), _cycle(list(SUBPOPULATIONS)), strict=False)]
    seeds: list[int] = []
    seed = start
    for name in wanted:
        while subpopulation_of(seed) != name or seed in seeds:
            seed += 1
        seeds.append(seed)
        seed = start
    return seeds


def _cycle(names: list[str]) -> Any:
    while True:
        yield from names


def score_config(spec: ModelSpec, name: str) -> dict[str, Any]:
    config = inference_config(spec)
    method = name if name in ("mc_dropout", "flip_tta") else "entropy"
    config["uncertainty"] = {**config["uncertainty"], "method": method}
    return config


def evaluate(model: torch.nn.Module, holdout: list[Study], spec: ModelSpec) -> dict[str, Any]:
    scores = dice_per_volume(model, [(s.hu, s.labels, s.spacing) for s in holdout], spec)
    names = [label.name for label in spec.labels]
    per_study = [float(np.mean([score[n] for n in names])) for score in scores]
    by_group: dict[str, list[float]] = {}
    for study, value in zip(holdout, per_study, strict=True):
        by_group.setdefault(study.subpopulation, []).append(value)
    return {
        "dice": round(float(np.mean(per_study)), 4),
        "per_label": {n: round(float(np.mean([s[n] for s in scores])), 4) for n in names},
        "per_subpopulation": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_group.items())},
    }


def fine_tune(
    spec: ModelSpec, model: torch.nn.Module, labelled: list[Study], seed: int
) -> torch.nn.Module:
    """As the retraining flow does: from the champion, the spec's retraining settings."""
    settings = spec.retraining
    config = TrainingConfig(
        epochs=settings.epochs,
        steps_per_epoch=settings.steps_per_epoch,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=seed,
    )
    tuned, _ = train(spec, [s.example for s in labelled], config, initial=trainable(spec, model))
    return tuned


def run(
    spec: ModelSpec,
    name: str,
    seed: int,
    pool: list[Study],
    holdout: list[Study],
    start: tuple[torch.nn.Module, list[int], dict[int, Analysis], dict[str, Any]],
    rounds: int,
    batch: int,
) -> dict[str, Any]:
    model, initial, first_drafts, first_eval = start
    chosen = strategy(name)
    labelled = list(initial)
    embeddings = {key: first_drafts[key].embedding for key in initial}
    curve = [{"labels": len(labelled), **first_eval}]
    picked: list[list[str]] = []
    seconds = {"score": 0.0, "train": 0.0, "evaluate": 0.0}
    for round_ in range(rounds):
        open_keys = [key for key in range(len(pool)) if key not in labelled]
        started = time.perf_counter()
        if chosen.needs is None:
            drafts: dict[int, Analysis] = {}
        elif round_ == 0 and name not in ("mc_dropout", "flip_tta"):
            drafts = {key: first_drafts[key] for key in open_keys}
        else:
            config = score_config(spec, name)
            drafts = {
                key: analyse(model, pool[key].hu, pool[key].spacing, config) for key in open_keys
            }
        seconds["score"] += time.perf_counter() - started
        candidates = [
            Candidate(
                key,
                drafts[key].scores if key in drafts else {},
                drafts[key].embedding if key in drafts else None,
            )
            for key in open_keys
        ]
        covered = np.stack([embeddings[k] for k in labelled if k in embeddings] or [np.zeros(0)])
        picks = chosen.rank(candidates, covered, batch, seed)
        for pick in picks:
            labelled.append(pick.key)
            if pick.key in drafts:
                embeddings[pick.key] = drafts[pick.key].embedding
        picked.append([pool[p.key].subpopulation for p in picks])
        started = time.perf_counter()
        model = fine_tune(spec, model, [pool[k] for k in labelled], seed * 100 + round_ + 1)
        seconds["train"] += time.perf_counter() - started
        started = time.perf_counter()
        curve.append({"labels": len(labelled), **evaluate(model, holdout, spec)})
        seconds["evaluate"] += time.perf_counter() - started
        print(
            f"  seed {seed} {name:>10} round {round_ + 1}: {len(labelled)} labels, "
            f"Dice {curve[-1]['dice']:.4f}, picked {picked[-1]}",
            flush=True,
        )
    return {
        "strategy": name,
        "seed": seed,
        "curve": curve,
        "picked_subpopulations": picked,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def starting_point(
    spec: ModelSpec, seed: int, pool: list[Study], holdout: list[Study], initial: int, epochs: int
) -> tuple[torch.nn.Module, list[int], dict[int, Analysis], dict[str, Any]]:
    """The seed's initial labelled studies, the model trained on them from scratch (as
    `radloop models bootstrap`), its drafts of the whole pool and its holdout Dice."""
    rng = np.random.default_rng([seed, 0x5E])
    keys = [int(k) for k in rng.choice(len(pool), size=initial, replace=False)]
    config = TrainingConfig(
        epochs=epochs,
        steps_per_epoch=spec.retraining.steps_per_epoch,
        batch_size=spec.retraining.batch_size,
        seed=seed,
    )
    began = time.perf_counter()
    model, _ = train(spec, [pool[k].example for k in keys], config)
    print(f"  trained in {time.perf_counter() - began:.0f} s; drafting the pool", flush=True)
    entropy = score_config(spec, "entropy")
    drafts = {k: analyse(model, s.hu, s.spacing, entropy) for k, s in enumerate(pool)}
    return model, keys, drafts, evaluate(model, holdout, spec)


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Labels at which the curve first reaches `target`, linearly between points."""
    for (n0, d0), (n1, d1) in itertools.pairwise(curve):
        if d0 >= target:
            return float(n0)
        if d1 >= target:
            return n0 + (n1 - n0) * (target - d0) / (d1 - d0)
    return float(curve[0][0]) if curve and curve[0][1] >= target else None


def summarise(runs: list[dict[str, Any]], default: str) -> dict[str, Any]:
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for result in runs:
        by_strategy.setdefault(result["strategy"], []).append(result)
    summary: dict[str, Any] = {}
    for name, results in by_strategy.items():
        labels = [point["labels"] for point in results[0]["curve"]]
        dice = np.array([[point["dice"] for point in r["curve"]] for r in results])
        mean = dice.mean(axis=0)
        area = sum(
            (n1 - n0) * (d0 + d1) / 2
            for n0, n1, d0, d1 in zip(labels, labels[1:], mean, mean[1:], strict=False)
        )
        auc = float(area / (labels[-1] - labels[0]))
        groups = sorted({g for r in results for p in r["picked_subpopulations"] for g in p})
        picked = [g for r in results for p in r["picked_subpopulations"] for g in p]
        summary[name] = {
            "seeds": [r["seed"] for r in results],
            "labels": labels,
            "dice_mean": [round(float(v), 4) for v in mean],
            "dice_sd": [round(float(v), 4) for v in dice.std(axis=0)],
            "auc": round(auc, 4),
            "final_per_subpopulation": {
                group: round(
                    float(np.mean([r["curve"][-1]["per_subpopulation"][group] for r in results])),
                    4,
                )
                for group in results[0]["curve"][-1]["per_subpopulation"]
            },
            "picked_rare_share": round(sum(g != "common" for g in picked) / max(1, len(picked)), 3),
            "picked": {g: picked.count(g) for g in groups},
        }
    if "random" not in summary:
        return {"strategies": summary}
    target = summary["random"]["dice_mean"][-1]
    final_labels = summary["random"]["labels"][-1]
    for entry in summary.values():
        points = list(zip(entry["labels"], entry["dice_mean"], strict=True))
        reached = labels_to_reach(points, target)
        entry["labels_to_reach_random_final"] = None if reached is None else round(reached, 2)
        entry["ratio_to_random"] = None if reached is None else round(reached / final_labels, 3)
    best = min(
        (n for n in summary if summary[n]["ratio_to_random"] is not None),
        key=lambda n: (summary[n]["ratio_to_random"], -summary[n]["auc"]),
    )
    ratio = summary.get(default, {}).get("ratio_to_random")
    return {
        "strategies": summary,
        "random_final_dice": target,
        "default": default,
        "default_ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "default_met": ratio is not None and ratio <= TARGET_RATIO,
        "best": best,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, entry in result["summary"]["strategies"].items():
        labels, mean, sd = entry["labels"], np.array(entry["dice_mean"]), np.array(entry["dice_sd"])
        peer = name == "random"
        line = axis.plot(
            labels,
            mean,
            marker="o",
            linestyle="--" if peer else "-",
            color="black" if peer else None,
            label=f"{name} (AUC {entry['auc']:.3f})",
        )
        axis.fill_between(labels, mean - sd, mean + sd, alpha=0.12, color=line[0].get_color())
    axis.set_xlabel("validated labels")
    axis.set_ylabel("holdout Dice (mean of labels)")
    seeds = len(result["seeds"])
    plural = "s" if seeds != 1 else ""
    axis.set_title(f"Label efficiency on the heterogeneous pool ({seeds} seed{plural}, ±1 sd)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--strategies", nargs="+", default=["random", "entropy", "diversity", "hybrid"]
    )
    parser.add_argument("--pool", type=int, default=24)
    parser.add_argument("--holdout", type=int, default=7)
    parser.add_argument("--initial", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bootstrap-epochs", type=int, default=30)
    parser.add_argument(
        "--epochs", type=int, help="fine-tuning epochs (default: the spec's; fewer for a smoke run)"
    )
    parser.add_argument("--pool-start", type=int, default=10_000)
    parser.add_argument("--holdout-start", type=int, default=50_000)
    parser.add_argument("--work", type=Path, default=Path("bench/results/active_learning"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    if args.epochs is not None:
        retraining = spec.retraining.model_copy(update={"epochs": args.epochs})
        spec = spec.model_copy(update={"retraining": retraining})
    started = time.perf_counter()
    pool = [load_study(args.pool_start + i, spec) for i in range(args.pool)]
    holdout = [load_study(s, spec) for s in holdout_seeds(args.holdout, args.holdout_start)]
    print(
        f"pool {args.pool}: "
        + ", ".join(f"{g} {sum(s.subpopulation == g for s in pool)}" for g in SUBPOPULATIONS),
        flush=True,
    )
    args.work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        todo = [
            name
            for name in args.strategies
            if not (args.resume and (args.work / f"{seed}-{name}.json").exists())
        ]
        if todo:
            print(f"seed {seed}: training the starting model", flush=True)
            start = starting_point(spec, seed, pool, holdout, args.initial, args.bootstrap_epochs)
        for name in args.strategies:
            path = args.work / f"{seed}-{name}.json"
            if name in todo:
                result = run(spec, name, seed, pool, holdout, start, args.rounds, args.batch)
                path.write_text(json.dumps(result, indent=2) + "\n")
            runs.append(json.loads(path.read_text()))
    result = {
        "machine": machine(),
        "seeds": args.seeds,
        "pool": {
            "size": args.pool,
            "subpopulations": {g: sum(s.subpopulation == g for s in pool) for g in SUBPOPULATIONS},
        },
        "holdout": {
            "size": args.holdout,
            "subpopulations": {
                g: sum(s.subpopulation == g for s in holdout) for g in SUBPOPULATIONS
            },
        },
        "initial": args.initial,
        "batch": args.batch,
        "rounds": args.rounds,
        "bootstrap_epochs": args.bootstrap_epochs,
        "retraining": spec.retraining.model_dump(),
        "summary": summarise(runs, spec.active_learning.strategy.value),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    summary = result["summary"]
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(f"\n{'strategy':>10} {'AUC':>6} {'final':>6} {'to random':>9} {'ratio':>6} {'rare':>5}")
    for name, entry in summary["strategies"].items():
        reach = entry.get("labels_to_reach_random_final")
        ratio = entry.get("ratio_to_random")
        print(
            f"{name:>10} {entry['auc']:6.3f} {entry['dice_mean'][-1]:6.3f} "
            f"{'never' if reach is None else f'{reach:.1f}':>9} "
            f"{'—' if ratio is None else f'{ratio:.2f}':>6} {entry['picked_rare_share']:5.2f}"
        )
    if "default" in summary:
        verdict = "met" if summary["default_met"] else "MISSED"
        print(
            f"{verdict}: the default ({summary['default']}) reaches random's final Dice "
            f"{summary['random_final_dice']:.4f} with {summary['default_ratio']} × the labels "
            f"(target ≤ {TARGET_RATIO}); best: {summary['best']}"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
