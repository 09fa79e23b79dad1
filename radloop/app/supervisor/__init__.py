"""Supervision of the child processes `radloop up` runs: `process` (one child that dies with
its parent, via `guard.py`; the tests' servers use it too), `specs` (what each part runs and how
it is probed), `supervisor` (start in order, restart with backoff, give up, clean up after a
killed predecessor)."""

from radloop.app.supervisor.process import ChildProcess
from radloop.app.supervisor.specs import (
    ChildSpec,
    mlflow_spec,
    orthanc_spec,
    prefect_spec,
    review_spec,
    triton_spec,
    worker_spec,
)
from radloop.app.supervisor.supervisor import Child, Supervisor, SupervisorError, port_holder

__all__ = [
    "Child",
    "ChildProcess",
    "ChildSpec",
    "Supervisor",
    "SupervisorError",
    "mlflow_spec",
    "orthanc_spec",
    "port_holder",
    "prefect_spec",
    "review_spec",
    "triton_spec",
    "worker_spec",
]
