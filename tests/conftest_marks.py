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
