"""Click-guided correction (issue 12): Dice after 0…N clicks per label, clicks to reach a Dice
(NoC@85, NoC@90) and per-click latency through Triton.

On held-out phantoms the simulated reader clicks, each round, at the centre of the largest
region where each label is wrong (`agents.interactive.reader_clicks`). Three ways to a label:

* (a) `draft`: the automatic model's draft alone — what the reader has without assistance;
* (b) `draft+clicks`: the interactive model refining the draft with the reader's clicks;
* (c) `clicks`: the interactive model from an empty label.

The models are the served versions of a repository (`radloop models bootstrap phantom-abdomen`
and `… --interactive` write them); the curves are computed in-process with the code Triton runs,
and the latency is timed through a `tritonserver` this script starts on that repository, for
each click of (b).

    python bench/interactive.py --repository ~/.local/share/radloop/model-repository \
        --json-out bench/results/interactive.json --plot docs/img/interactive.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from annotate import configure, machine
from numpy.typing import NDArray

from agents.interactive import Clicks, dice_after_clicks, reader_clicks
from agents.metrics import mean_dice
from model_registry.inference import TritonBackend
from model_registry.repository import TritonRepository
from model_registry.triton_model.clicks import refine
from model_registry.triton_model.drafting import segment
from model_registry.triton_model.model import load
from radloop.app.phantoms import generate
from radloop.app.supervisor import Child, triton_spec
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec

TARGETS = {
    "dice_within_5_clicks": 0.90,  # (b) or (c) reaches this within 5 clicks per label
    "gain_after_3_clicks": 0.10,  # (b) after 3 clicks minus (a)
    "click_p50_seconds": 0.5,
}


def noc(curve: list[float], threshold: float) -> int | None:
    """Clicks per label until the mean Dice first reaches `threshold` (None: never)."""
    return next((clicks for clicks, dice in enumerate(curve) if dice >= threshold), None)


def curves(
    spec: ModelSpec, repository: TritonRepository, phantoms: int, rounds: int, seed: int
) -> dict[str, Any]:
    name = str(spec.interactive_name)
    auto_version = repository.champion(spec.name)
    interactive_version = repository.champion(name)
    if auto_version is None or interactive_version is None:
        raise SystemExit(
            f"{repository.store.url()} lacks {spec.name} or {name}: run `radloop models "
            f"bootstrap {spec.name}` and `radloop models bootstrap {spec.name} --interactive`"
        )
    with repository.version_folder(spec.name, auto_version) as folder:
        auto, auto_config = load(folder, torch.device("cpu"))
    with repository.version_folder(name, interactive_version) as folder:
        interactive, config = load(folder, torch.device("cpu"))
    ways: dict[str, list[list[float]]] = {"draft": [], "draft+clicks": [], "clicks": []}
    for index in range(phantoms):
        phantom = generate(seed + index)
        draft, _ = segment(auto, phantom.hu, phantom.spacing, auto_config)

        def run(clicks: Clicks, previous: NDArray[Any] | None, hu: Any = phantom.hu) -> Any:
            return refine(interactive, hu, clicks, previous, config)

        alone = mean_dice(dice_after_clicks(run, phantom.labels, spec, 0, draft)[0])
        ways["draft"].append([alone] * (rounds + 1))
        for way, start in (("draft+clicks", draft), ("clicks", None)):
            scores = dice_after_clicks(run, phantom.labels, spec, rounds, start)
            ways[way].append([mean_dice(score) for score in scores])
    return {
        "versions": {spec.name: auto_version, name: interactive_version},
        "curves": {way: np.mean(rows, axis=0).round(4).tolist() for way, rows in ways.items()},
    }


def latencies(
    spec: ModelSpec, repository: Path, phantoms: int, rounds: int, seed: int
) -> list[float]:
    """Seconds of each click round of (b) through Triton (volume up, label back)."""
    name = str(spec.interactive_name)
    with tempfile.TemporaryDirectory(prefix="radloop-bench-interactive-") as folder:
        settings, _ = configure(Path(folder), {})
        triton = settings.triton.model_copy(update={"repository": repository})
        child = Child(triton_spec(settings.model_copy(update={"triton": triton})))
        child.start()
        try:
            child.wait_healthy()
            backend = TritonBackend(child.spec.url)
            backend.load(name)
            backend.load(spec.name)
            seconds: list[float] = []
            for index in range(phantoms):
                phantom = generate(seed + index)
                hu = phantom.hu.astype(np.float32)
                current = backend.infer(spec.name, hu, phantom.spacing).labels
                clicks = np.zeros((0, 4), dtype=np.int64)
                values = [label.value for label in spec.labels]
                for _ in range(rounds):
                    new = reader_clicks(current, phantom.labels, values)
                    if not len(new):
                        break
                    clicks = np.concatenate([clicks, new])
                    started = time.perf_counter()
                    current = backend.refine(name, hu, phantom.spacing, clicks, current).labels
                    seconds.append(time.perf_counter() - started)
        finally:
            child.stop()
    return seconds


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    labels = {
        "draft": "(a) automatic draft alone",
        "draft+clicks": "(b) draft + interactive model",
        "clicks": "(c) interactive model from an empty label",
    }
    for way, curve in result["curves"].items():
        axes.plot(range(len(curve)), curve, marker="o", label=labels[way])
    axes.axhline(TARGETS["dice_within_5_clicks"], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("simulated clicks per label")
    axes.set_ylabel("mean Dice over labels and holdout phantoms")
    axes.set_ylim(0, 1)
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--phantoms", type=int, default=5)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=9000, help="first holdout phantom's seed")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    result: dict[str, Any] = {"machine": machine(), "phantoms": args.phantoms}
    result.update(
        curves(spec, TritonRepository(args.repository), args.phantoms, args.clicks, args.seed)
    )
    seconds = latencies(spec, args.repository, args.phantoms, args.clicks, args.seed)
    result["click_seconds"] = {
        "n": len(seconds),
        "p50": round(statistics.median(seconds), 3),
        "p95": round(float(np.percentile(seconds, 95)), 3),
    }
    result["noc"] = {
        way: {"85": noc(curve, 0.85), "90": noc(curve, 0.90)}
        for way, curve in result["curves"].items()
    }
    best = max(result["curves"]["draft+clicks"][:6] + result["curves"]["clicks"][:6])
    gain = result["curves"]["draft+clicks"][3] - result["curves"]["draft"][3]
    result["targets"] = {
        "Dice >= 0.90 within 5 clicks per label": {"measured": best, "met": best >= 0.90},
        "+0.10 over the draft after 3 clicks": {"measured": round(gain, 4), "met": gain >= 0.10},
        "per-click latency <= 0.5 s p50": {
            "measured": result["click_seconds"]["p50"],
            "met": result["click_seconds"]["p50"] <= TARGETS["click_p50_seconds"],
        },
    }
    print(json.dumps(result, indent=2))
    print(f"\n{'clicks/label':>12} " + " ".join(f"{n:>6}" for n in range(args.clicks + 1)))
    for way, curve in result["curves"].items():
        print(f"{way:>12} " + " ".join(f"{d:6.3f}" for d in curve))
    print(
        f"per click through Triton: p50 {result['click_seconds']['p50']} s, "
        f"p95 {result['click_seconds']['p95']} s"
    )
    for text, verdict in result["targets"].items():
        print(f"{'met ' if verdict['met'] else 'MISSED'} {text}: {verdict['measured']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
