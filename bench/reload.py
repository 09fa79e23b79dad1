"""Triton version load (issue 11): seconds from the `load_model` call to the new version READY.

For each configuration — radloop's model code (`model.py` and its siblings) or another
`model.py` given with `--model-py NAME=PATH`, × Triton's config auto-completion on or off — a
block starts the wheel's `tritonserver` on a fresh repository, loads v1, then adds and loads
`--loads` new versions one after another (each folder appears whole, as
`TritonRepository.export` writes it; every version of the block has the same code). Blocks
run in turn, `--rounds` times, so configurations meet the same background load.

    python bench/reload.py --json-out bench/results/reload.json
    # before and after issue 11's torch-only model.py:
    git show 2af3a54:model_registry/triton_model.py > /tmp/monai_model.py
    git show fdd9ef0:model_registry/triton_model.py > /tmp/torch_model.py
    python bench/reload.py --model-py monai=/tmp/monai_model.py \
        --model-py torch=/tmp/torch_model.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from annotate import configure, machine

from model_registry.inference import TritonBackend
from model_registry.repository import MODEL_CODE, TritonRepository
from radloop.app.supervisor import Child, triton_spec
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.wait import wait_until

AUTO_COMPLETE_OFF = "--disable-auto-complete-config"


def block(
    spec: ModelSpec,
    network: torch.jit.ScriptModule,
    code: dict[str, bytes],
    auto: bool,
    loads: int,
) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="radloop-bench-reload-") as folder:
        settings, _ = configure(Path(folder), {})
        repository = TritonRepository(settings.model_repository)
        repository.export(spec, network)
        model_dir = settings.model_repository / spec.name
        for file, text in code.items():
            (model_dir / "1" / file).write_bytes(text)
        base = triton_spec(settings)
        argv = [a for a in base.argv if a != AUTO_COMPLETE_OFF]
        child = Child(dataclasses.replace(base, argv=argv if auto else [*argv, AUTO_COMPLETE_OFF]))
        child.start()
        seconds = []
        try:
            child.wait_healthy()
            backend = TritonBackend(child.spec.url)
            backend.load(spec.name)
            for _ in range(loads):
                version = repository.versions(spec.name)[-1] + 1
                staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".staging-"))
                torch.jit.save(network, str(staging / "model.pt"))
                (staging / "spec.json").write_bytes((model_dir / "1" / "spec.json").read_bytes())
                for file, text in code.items():
                    (staging / file).write_bytes(text)
                staging.rename(model_dir / str(version))
                time.sleep(4)  # the stubs the last load replaced have exited
                started = time.monotonic()
                backend.load(spec.name)
                wait_until(partial(backend.ready, spec.name, str(version)), 300, 0.05)
                seconds.append(round(time.monotonic() - started, 2))
        finally:
            child.stop()
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-py", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    codes = {"radloop": {path.name: path.read_bytes() for path in MODEL_CODE}}
    if args.model_py:
        codes = {
            n: {"model.py": Path(p).read_bytes()}
            for n, p in (m.split("=", 1) for m in args.model_py)
        }
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    torch.manual_seed(1)  # untrained, seeded: weights do not change load time
    network = torch.jit.script(spec.network.build().eval())
    loads: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, code in codes.items():
            for auto in (True, False):
                key = f"{name}, auto-complete {'on' if auto else 'off'}"
                loads.setdefault(key, []).extend(block(spec, network, code, auto, args.loads))
                print(key, loads[key][-args.loads :], flush=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "configurations": {
            key: {
                "median_s": statistics.median(values),
                "min_s": min(values),
                "max_s": max(values),
                "loads_s": values,
            }
            for key, values in loads.items()
        },
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
