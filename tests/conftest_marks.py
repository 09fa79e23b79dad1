"""Marks shared by test modules."""

from __future__ import annotations

import os

import pytest

# Model training and Triton serving behave the same on either state store: run such tests in
# the SQLite pass only, so `make test` stays near 30 minutes on 2 cores.
ONCE = pytest.mark.skipif(
    os.environ.get("RADLOOP_TEST_DATABASE") == "postgresql",
    reason="no database-specific behaviour: runs in the SQLite pass",
)

# `make test` runs two pytest-xdist workers. The tests that run the whole stack (or train and
# serve at length) keep both cores about 80 % busy on their own: they run one at a time, in one
# worker, while the other worker runs the rest beside them.
STACK = pytest.mark.xdist_group("stack")
