"""The training work pool as a hospital IT admin sets it up for a cluster: `radloop worker
--queue train` serves a Kubernetes pool with the job template from deploy/ (each training a
Job with a GPU of its own), keeps the pool's template equal to that file, and refuses a pool
of another type instead of leaving trainings waiting for a worker that never comes.

No cluster here: the Job that prefect-kubernetes renders from the template is checked against
the Kubernetes schemas in test_deploy.py; the process pool trains for real in test_cluster.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.deploy_files import TRAINING_JOB_TEMPLATE
from tests.servers import RADLOOP, RadloopProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

POOL = "gpu-jobs"


@ONCE  # Prefect's work pools; the training worker's database use runs on PostgreSQL in
# test_cluster
def test_the_training_worker_serves_a_kubernetes_pool_with_deploys_job_template(
    radloop_env: dict[str, str], settings: Settings, prefect_server: Any, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect_kubernetes.worker import KubernetesWorker

    # The admin made the pool with Prefect's own default template (`prefect work-pool create
    # --type kubernetes`); radloop's worker puts deploy/'s template in its place.
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=POOL,
                type="kubernetes",
                base_job_template=KubernetesWorker.get_default_base_job_template(),
            )
        )
    env = {
        **radloop_env,
        "RADLOOP_RETRAIN__WORK_POOL": POOL,
        "RADLOOP_RETRAIN__WORK_POOL_TYPE": "kubernetes",
        "RADLOOP_RETRAIN__WORK_POOL_TEMPLATE": str(TRAINING_JOB_TEMPLATE),
    }
    worker = RadloopProcess(env, ("worker", "--queue", "train"), name="trainer").launch()
    try:
        with get_client(sync_client=True) as client:

            def online() -> list[Any]:
                workers = client.read_workers_for_work_pool(POOL, limit=10, offset=0)
                return [w for w in workers if w.status == "ONLINE"]

            wait_until(online, timeout=120, interval=1, what="a worker of the pool online")
            pool = client.read_work_pool(POOL)
            assert pool.type == "kubernetes"
            assert pool.base_job_template == json.loads(TRAINING_JOB_TEMPLATE.read_text())
            deployment = client.read_deployment_by_name("retrain-model/retrain")
            assert deployment.work_pool_name == POOL
        assert f"training, kubernetes work pool {POOL}" in worker.output()
    finally:
        assert worker.stop(sig=signal.SIGINT, timeout=30) == 0, worker.output()

    # The same pool with the type left at its default (process): refused, with the way out.
    refused = subprocess.run(
        [RADLOOP, "worker", "--queue", "train"],
        env={**radloop_env, "RADLOOP_RETRAIN__WORK_POOL": POOL},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    said = " ".join((refused.stdout + refused.stderr).split())
    assert f"the work pool {POOL} is a kubernetes pool" in said
    assert "but retrain.work_pool_type is process" in said
    assert "RADLOOP_RETRAIN__WORK_POOL_TYPE=kubernetes" in said

    # A template edited wrong (a placeholder no variable declares): refused with Prefect's
    # reason, and the pool keeps the template it had.
    broken = json.loads(TRAINING_JOB_TEMPLATE.read_text())
    del broken["variables"]["properties"]["gpus"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    refused = subprocess.run(
        [RADLOOP, "worker", "--queue", "train"],
        env={**env, "RADLOOP_RETRAIN__WORK_POOL_TEMPLATE": str(tmp_path / "broken.json")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    said = " ".join((refused.stdout + refused.stderr).split())
    assert "Prefect refused the job template" in said and "gpus" in said
    with get_client(sync_client=True) as client:
        kept = client.read_work_pool(POOL).base_job_template
    assert kept == json.loads(TRAINING_JOB_TEMPLATE.read_text())
