"""Training on a Kubernetes or Docker work pool, checked without a cluster or a daemon: what
prefect-kubernetes's and prefect-docker's workers would send for one training run, rendered by
their own job configurations from the templates in deploy/. (The Job is also one of the
workloads every check in test_deploy.py covers: schemas, GPUs, mounts, secrets, settings.)"""

from __future__ import annotations

from pathlib import Path

from tests import deploy_files as d


def test_training_runs_as_jobs_of_the_work_pool_worker_train_keeps() -> None:
    worker = d.workloads()["worker-train"]
    [container] = d.spec_of(worker)["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RADLOOP_RETRAIN__WORK_POOL_TYPE"] == "kubernetes"
    template = Path(env["RADLOOP_RETRAIN__WORK_POOL_TEMPLATE"])
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(template.parent)]
    [volume] = [v for v in d.spec_of(worker)["volumes"] if v["name"] == mount["name"]]
    [generator] = d.kustomization()["configMapGenerator"]
    assert volume["configMap"]["name"] == generator["name"]
    assert generator["files"] == [template.name] == [d.TRAINING_JOB_TEMPLATE.name]
    # The Jobs run radloop's image, the one kustomize sets for every radloop pod...
    [image] = [i for i in d.kustomization()["images"] if i["name"] == d.RADLOOP_IMAGE]
    [job] = d.spec_of(d.training_job())["containers"]
    assert job["image"] == f"{image['newName']}:{image['newTag']}"
    # ... Prefect's command for one flow run, under the image's init; each Job runs once.
    assert job["command"] == ["/usr/bin/tini", "--"]
    assert job["args"] == ["prefect", "flow-run", "execute"]
    assert d.training_job()["spec"]["backoffLimit"] == 0
    # The worker may create and watch Jobs and their pods; a Job gets no API access.
    [role] = [r for _, r in d.manifests() if r["kind"] == "Role"]
    granted = {resource for rule in role["rules"] for resource in rule["resources"]}
    assert {"jobs", "pods", "pods/log"} <= granted
    assert d.spec_of(worker)["serviceAccountName"] == "radloop-trainer"
    job = d.spec_of(d.training_job())
    assert job["automountServiceAccountToken"] is False
    accounts = {r["metadata"]["name"] for _, r in d.manifests() if r["kind"] == "ServiceAccount"}
    assert {job["serviceAccountName"], "radloop-trainer"} <= accounts
    assert d.training_job()["metadata"]["namespace"] == d.kustomization()["namespace"]
    # The secrets the Job reads by name: kustomize must not suffix that name.
    [secrets] = d.kustomization()["secretGenerator"]
    assert secrets["options"]["disableNameSuffixHash"] is True


def test_a_training_container_gets_a_gpu_the_shared_directory_and_the_sites_settings() -> None:
    created = d.training_container()
    host = created["host_config"]
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host["ShmSize"] > 0  # PyTorch's data loaders share batches through /dev/shm
    assert host["NetworkMode"] == "host"  # the addresses radloop's settings name
    assert f"/srv/radloop:{d.DATA_DIR}" in host["Binds"]
    assert f"/srv/radloop/{d.MODEL_SUBPATH}:{d.MODEL_REPOSITORY}" in host["Binds"]
    assert "/etc/radloop:/etc/radloop:ro" in host["Binds"]
    # Prefect's command for one run under the image's init, as radloop's user.
    assert created["entrypoint"] == ["/usr/bin/tini", "--"]
    assert created["command"] == "prefect flow-run execute"
    assert created["user"] == "10001:10001"
    env = created["environment"]
    assert env["RADLOOP_DATA_DIR"] == d.DATA_DIR
    assert env["RADLOOP_TRITON__REPOSITORY"] == d.MODEL_REPOSITORY
    assert env["RADLOOP_CONFIG"].startswith("/etc/radloop/")  # the site's file, passwords in it
    radloop = [n for n in env if n.startswith("RADLOOP_") and n != "RADLOOP_CONFIG"]
    assert [n for n in radloop if not d.is_setting(n)] == []
