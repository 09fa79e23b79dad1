"""Training on a GPU: the product's CUDA + mixed-precision path against its CPU path.

`agents.trainer.train` trains on the GPU with autocast + GradScaler when torch sees one, else
on the CPU in fp32. This runs that function as the product does — the packaged spec
(`phantom-abdomen`), phantoms from `radloop.app.phantoms` prepared with the served
model's own preprocessing — on both devices of one machine, in the same run:

* GPU (AMP): `--epochs` epochs; seconds per optimiser step from the second epoch on (the first
  holds CUDA's start-up); the loss curve; Dice per label on `--eval` held-out phantoms
  (`agents.trainer.evaluate`, sliding-window inference as Triton runs it).
* CPU (the peer, fp32): `--cpu-epochs` epochs of the same steps, for seconds per step.

    python bench/train_gpu.py --json-out bench/results/train_gpu.json

Prints JSON, then a table. Needs torch, MONAI, pydantic, pydicom and nibabel; no server.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from agents.trainer import TrainingConfig, evaluate, prepare, train
from radloop.app.phantoms import generate
from radloop.modelspec import PACKAGED_MODELS, load_spec


def timed_training(
    device: torch.device, examples: list[Any], spec: Any, config: TrainingConfig
) -> tuple[torch.nn.Module, dict[str, Any]]:
    marks: list[float] = []
    started = time.perf_counter()
    network, report = train(
        spec,
        examples,
        config,
        on_epoch=lambda epoch, loss: marks.append(time.perf_counter()),
        device=device,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    epochs = [b - a for a, b in zip([started, *marks[:-1]], marks, strict=True)]
    steady = epochs[1:] or epochs
    return network, {
        "device": device.type,
        "mixed_precision": device.type == "cuda",
        "epochs": config.epochs,
        "steps_per_epoch": config.steps_per_epoch,
        "batch_size": config.batch_size,
        "first_epoch_s": round(epochs[0], 3),
        "s_per_step": round(statistics.median(steady) / config.steps_per_epoch, 4),
        "total_s": round(time.perf_counter() - started, 2),
        "loss_first": round(report.epoch_losses[0], 4),
        "loss_last": round(report.epoch_losses[-1], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=8, help="training phantoms")
    parser.add_argument("--eval", type=int, default=3, help="held-out phantoms for Dice")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch")
    parser.add_argument("--cpu-epochs", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark compares the GPU path with the CPU path")

    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    started = time.perf_counter()
    phantoms = [generate(100 + i) for i in range(args.train)]
    examples = [prepare(p.hu, p.labels, p.spacing, spec) for p in phantoms]
    held_out = [generate(900 + i) for i in range(args.eval)]
    prepare_s = time.perf_counter() - started

    gpu_config = TrainingConfig(epochs=args.epochs, steps_per_epoch=args.steps, seed=1)
    network, gpu = timed_training(torch.device("cuda"), examples, spec, gpu_config)
    started = time.perf_counter()
    gpu["holdout_dice"] = {
        name: round(score, 3)
        for name, score in evaluate(
            network, [(p.hu, p.labels, p.spacing) for p in held_out], spec
        ).items()
    }
    gpu["evaluate_s"] = round(time.perf_counter() - started, 2)

    cpu_config = TrainingConfig(epochs=args.cpu_epochs, steps_per_epoch=args.steps, seed=1)
    _, cpu = timed_training(torch.device("cpu"), examples, spec, cpu_config)

    result = {
        "gpu_name": torch.cuda.get_device_name(0),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "phantoms": {"train": args.train, "eval": args.eval, "prepare_s": round(prepare_s, 2)},
        "gpu_amp": gpu,
        "cpu_fp32": cpu,
        "cpu_over_gpu_s_per_step": round(cpu["s_per_step"] / gpu["s_per_step"], 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text)
    print(f"\n{'path':<14}{'s/step':>9}{'1st epoch s':>13}{'loss first→last':>20}")
    for name, row in (("GPU, AMP", gpu), ("CPU, fp32", cpu)):
        losses = f"{row['loss_first']:.3f} → {row['loss_last']:.3f}"
        print(f"{name:<14}{row['s_per_step']:>9.4f}{row['first_epoch_s']:>13.2f}{losses:>20}")
    print(f"CPU/GPU seconds per step: {result['cpu_over_gpu_s_per_step']}×  ({result['gpu_name']})")
    print(f"holdout Dice after {args.epochs} GPU epochs: {gpu['holdout_dice']}")


if __name__ == "__main__":
    main()
