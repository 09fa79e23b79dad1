"""`/monailabel/…`: MONAI Label's server API with radloop's meaning, so 3D Slicer's MONAI Label
module, OHIF's MONAI Label panel and `MONAILabelClient` work against radloop unchanged (a
Slicer user types `http://<host>:8080/monailabel/`).

The image id is the SeriesInstanceUID of a drafted series. The next sample is the top of
radloop's worklist, claimed for the caller; a saved label is the correction of that case
through the same intake as the review API (same checks, refusals, events); inference with the
task model answers its draft, with the interactive model a refinement of the reader's clicks
(`agents.review.assist`). Auth is MONAI Label's token flow on radloop's users: `/auth/token`
takes a user name and password and answers a bearer token that lasts as long as a browser
session; every clinical endpoint needs a role. Wire formats follow `monailabel` 0.8.5 (its
`client/client.py` and `endpoints/`).
"""

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import OAuth2PasswordRequestForm
from numpy.typing import NDArray

from agents.nifti import nrrd_label_bytes, write_nifti
from agents.review.audit import Action
from agents.review.auth import CORRECT, LoginLocked
from agents.review.corrections import is_label_volume
from agents.review.deps import (
    AssistantDep,
    Corrector,
    Reader,
    Reviewer,
    ReviewSettingsDep,
    TrainingDep,
    UsersDep,
    WorklistDep,
    require,
)
from agents.review.worklist import Worklist
from agents.selection import STRATEGIES as SELECTION_STRATEGIES
from agents.volume import LoadedSeries
from radloop.domain import AnnotationState
from radloop.modelspec import ModelSpec

router = APIRouter(prefix="/monailabel", tags=["monailabel"])

# MONAI Label's strategies: the worklist's order (each model's own strategy, urgent cases
# first), or one of radloop's strategies for this pick; the case is claimed for the caller.
STRATEGIES = {
    "worklist": "The top of radloop's worklist (each model's strategy), claimed for you",
    **{
        name: f"The next case by radloop's {name} strategy, claimed for you"
        for name in SELECTION_STRATEGIES
    },
}


def _models(specs: dict[str, ModelSpec]) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for spec in specs.values():
        labels = {label.name: label.value for label in spec.labels}
        models[spec.name] = {
            "type": "segmentation",
            "labels": labels,
            "dimension": 3,
            "description": f"{spec.description} (answers the case's draft)",
        }
        if spec.interactive_name is not None and spec.interactive is not None:
            models[spec.interactive_name] = {
                "type": spec.interactive.interaction.value,
                "labels": {**labels, "background": 0},
                "dimension": 3,
                "description": f"Click-guided refinement of {spec.name}'s labels",
            }
    return models


def _model(specs: dict[str, ModelSpec], name: str) -> tuple[ModelSpec, bool]:
    """The spec serving `name` and whether `name` is its interactive model; 404 otherwise."""
    for spec in specs.values():
        if name == spec.name:
            return spec, False
        if name == spec.interactive_name:
            return spec, True
    raise HTTPException(404, f"unknown model {name!r}; radloop serves {', '.join(_models(specs))}")


def _totals(worklist: Worklist) -> dict[str, Any]:
    """MONAI Label's datastore counts: every case, and those with a reader's label."""
    counts = worklist.counts()
    done = (AnnotationState.CORRECTED, AnnotationState.VALIDATED)
    return {"total": sum(counts.values()), "completed": sum(counts[s.value] for s in done)}


@router.get("/info/")
def info(who: Reader, worklist: WorklistDep) -> dict[str, Any]:
    """What Slicer and OHIF list: models (task models and their interactive models), labels,
    strategies, trainers and the datastore's counts. No top-level `config`: Slicer refuses a
    server that sends one."""
    specs = worklist.specs
    labels = sorted({label.name for spec in specs.values() for label in spec.labels})
    return {
        "name": "radloop",
        "description": "radloop: drafts from Triton, corrected by readers, retrained in a loop",
        "version": "1",
        "labels": labels,
        "models": _models(specs),
        "trainers": {
            name: {"description": f"radloop train {name}: fine-tune, MLflow, holdout gate"}
            for name in specs
        },
        "strategies": {name: {"description": text} for name, text in STRATEGIES.items()},
        "scoring": {},
        "train_stats": {},
        "datastore": _totals(worklist),
    }


@router.post("/activelearning/{strategy}")
def next_sample(
    strategy: str, who: Corrector, assistant: AssistantDep, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The case the caller holds, else the top drafted case of the worklist, claimed for
    them: `{"id": <SeriesInstanceUID>, ...}`; `{}` when nothing waits."""
    if strategy not in STRATEGIES:
        raise HTTPException(
            404, f"unknown strategy {strategy!r}; radloop offers {', '.join(STRATEGIES)}"
        )
    case = assistant.next_case(who.name, None if strategy == "worklist" else strategy)
    if case is None:
        return {}
    return {
        "id": case["series_uid"],
        "name": case["series_uid"],
        "strategy": strategy,
        # What OHIF's panel shows and opens (it reloads the page on StudyInstanceUID).
        "StudyInstanceUID": case["study_uid"],
        "SeriesInstanceUID": case["series_uid"],
        "StudyDate": case.get("study_date") or "",
        **case,
    }


def _nifti_bytes(array: NDArray[Any], series: LoadedSeries) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "volume.nii.gz"
        write_nifti(path, array, series.affine)
        return path.read_bytes()


@router.get("/datastore/")
def datastore(who: Reader, worklist: WorklistDep, output: str = "stats") -> dict[str, Any]:
    """The drafted series as MONAI Label's datastore: counts, and with `output=all` one
    object per series with its case and whether it has a final (corrected) label."""
    result = _totals(worklist)
    if output == "all":
        objects: dict[str, Any] = {}
        for item in worklist.items(states=None, limit=5000):
            series_uid = item.get("series_uid")
            if not series_uid or series_uid in objects:
                continue
            final = item["state"] in (
                AnnotationState.CORRECTED.value,
                AnnotationState.VALIDATED.value,
            )
            objects[series_uid] = {
                "image": {"info": {"annotation_id": item["annotation_id"], "state": item["state"]}},
                "labels": {"final": {"info": {"state": item["state"]}}} if final else {},
            }
        result["objects"] = objects
    return result


@router.get("/datastore/image")
async def datastore_image(image: str, who: Reader, assistant: AssistantDep) -> Response:
    """The series as NIfTI: the grid clicks are given on ([i, j, k] = column, row, slice)."""
    annotation_id = await run_in_threadpool(assistant.case_for_image, image)
    _, series = await run_in_threadpool(assistant.inputs, annotation_id)
    data = await run_in_threadpool(_nifti_bytes, series.array, series)
    await run_in_threadpool(assistant.worklist.audit.record, who.name, Action.VIEW, annotation_id)
    return Response(
        data,
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{image}.nii.gz"'},
    )


def _label_file(
    labels: NDArray[Any], series: LoadedSeries, request: dict[str, Any]
) -> tuple[bytes, str]:
    """The result file and its extension: an uncompressed uint8 NRRD when the client asks
    for `.nrrd` (OHIF's panel), else NIfTI (Slicer, the Python client)."""
    if str(request.get("result_extension", "")).lower() == ".nrrd":
        return nrrd_label_bytes(labels, series.affine), ".nrrd"
    return _nifti_bytes(labels, series), ".nii.gz"


def _multipart(params: dict[str, Any], name: str, data: bytes) -> Response:
    """MONAI Label's answer to the Python client and Slicer: the result's parameters as a
    form field, then the label file."""
    boundary = "radloop-monailabel-result"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
        f"{json.dumps(params)}\r\n--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return Response(body, media_type=f"multipart/form-data; boundary={boundary}")


@router.post("/infer/{model}")
async def infer(
    model: str,
    image: str,
    who: Reader,
    assistant: AssistantDep,
    worklist: WorklistDep,
    params: Annotated[str, Form()] = "{}",
    output: str | None = None,
    label: Annotated[UploadFile | None, File()] = None,
) -> Response:
    """The task model answers the case's draft; the interactive model refines the caller's
    clicks (`params`: `{<label>: [[i, j, k], …], "background": [[i, j, k], …]}`) on the case,
    which it claims for them. `output=image` answers the label file alone, `output=json` the
    parameters alone, anything else both (multipart). The file is NIfTI, or uint8 NRRD on the
    series grid with `"result_extension": ".nrrd"` in `params`."""
    spec, interactive = _model(worklist.specs, model)
    try:
        request = json.loads(params or "{}")
    except ValueError:
        raise HTTPException(422, "params is not JSON") from None
    if not isinstance(request, dict):
        raise HTTPException(422, "params must be a JSON object")
    annotation_id = await run_in_threadpool(assistant.case_for_image, image)
    case_spec, series = await run_in_threadpool(assistant.inputs, annotation_id)
    if case_spec.name != spec.name:
        raise HTTPException(
            422, f"series {image} is drafted by {case_spec.name}, not by {spec.name}"
        )
    answer: dict[str, Any] = {"label_names": {lb.name: lb.value for lb in spec.labels}}
    if interactive:
        require(who, CORRECT)
        refinement = await run_in_threadpool(assistant.refine, annotation_id, who.name, request)
        labels = refinement.labels
        answer.update(
            model_version=refinement.model_version,
            interaction_id=refinement.interaction_id,
            clicks=refinement.click_count,
            annotation_id=annotation_id,
        )
    else:
        labels = await run_in_threadpool(assistant.draft, annotation_id)
        answer.update(annotation_id=annotation_id)
    if output == "json":
        return JSONResponse(answer)
    data, extension = await run_in_threadpool(_label_file, labels, series, request)
    if output == "image":
        return Response(data, media_type="application/octet-stream")
    return _multipart(answer, f"{image}{extension}", data)


@router.put("/datastore/label")
async def save_label(
    image: str,
    who: Corrector,
    assistant: AssistantDep,
    worklist: WorklistDep,
    label: Annotated[UploadFile, File()],
    tag: str = "final",
    params: Annotated[str, Form()] = "{}",
) -> dict[str, Any]:
    """A reader's label for the series (NIfTI or NRRD on its grid, as 3D Slicer's MONAI Label
    module saves it) becomes the correction of its case, through the same intake as
    `PUT /api/annotations/{id}/label`."""
    data = await label.read()
    if not is_label_volume(data):
        raise HTTPException(415, "the label is neither NIfTI (.nii, .nii.gz) nor NRRD (.nrrd)")
    annotation_id = await run_in_threadpool(assistant.case_for_image, image)
    await run_in_threadpool(assistant.hold, annotation_id, who.name)
    item = await run_in_threadpool(worklist.correct_with_volume, annotation_id, who.name, data)
    return {"image": image, "label": image, "tag": tag, "annotation": item}


# -- training ---------------------------------------------------------------------------


@router.post("/train/{model}")
def train_start(
    model: str, who: Reviewer, worklist: WorklistDep, training: TrainingDep
) -> dict[str, Any]:
    """`radloop train MODEL` through Prefect: fine-tune, MLflow run, holdout gate, reload."""
    _model(worklist.specs, model)  # 404 for a model radloop does not serve
    return training.start(model)


@router.post("/train/")
def train_all(who: Reviewer, worklist: WorklistDep, training: TrainingDep) -> dict[str, Any]:
    """Every task model's training, as MONAI Label's "run all trainers" (OHIF's button)."""
    return {name: training.start(name) for name in sorted(worklist.specs)}


@router.get("/train/")
def train_status(who: Reader, training: TrainingDep, check_if_running: bool = False) -> Any:
    """The newest training of each model and the requested ones; with `check_if_running`,
    200 while one runs or waits and 404 otherwise (MONAI Label's fast check)."""
    status = training.status()
    if check_if_running and not status["running"]:
        return JSONResponse({"detail": "no training is running"}, status_code=404)
    return status


@router.delete("/train/")
def train_stop(who: Reviewer, training: TrainingDep) -> dict[str, Any]:
    """Cancel the retrain flow runs not yet ended."""
    return training.stop()


# -- auth ---------------------------------------------------------------------------------


@router.get("/auth/")
def auth_enabled() -> dict[str, Any]:
    """Always on: every clinical endpoint needs a radloop user."""
    return {"enabled": True, "client_id": "radloop", "realm": ""}


@router.post("/auth/token")
def auth_token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    request: Request,
    users: UsersDep,
    review: ReviewSettingsDep,
) -> dict[str, Any]:
    """A user name and password (or API token) for a bearer token that lasts as long as a
    browser session (`review.session_hours`) and ends at logout or when the user is disabled.
    Failed attempts count towards the login page's lock-out (429 while it lasts)."""
    client = request.client.host if request.client else ""
    try:
        opened = users.login(form.username, form.password, review.session_hours, client)
    except LoginLocked as locked:
        raise HTTPException(429, str(locked), {"Retry-After": str(locked.minutes * 60)}) from None
    if opened is None:
        raise HTTPException(401, "wrong user name or password", {"WWW-Authenticate": "Bearer"})
    return {"access_token": opened[0], "token_type": "bearer"}


@router.get("/auth/token/valid")
def auth_valid(who: Reader) -> dict[str, Any]:
    return {"username": who.name, "roles": [who.role.value]}
