"""Fuzzing: the hypothesis properties in tests/test_fuzz_*.py run a fixed, derandomised budget
in `make test`; `make fuzz` multiplies it (RADLOOP_FUZZ_SCALE) with fresh randomness and runs
the coverage-guided harnesses in this folder (atheris)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("RADLOOP_FUZZ_SCALE", "1")))


def budget(examples: int) -> settings:
    """`examples` per property in CI, reproducibly; SCALE times as many, random, in `make fuzz`."""
    return settings(
        max_examples=examples * SCALE,
        derandomize=SCALE == 1,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        print_blob=True,
    )
