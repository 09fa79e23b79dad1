"""Flow `annotate-study`: every completed study revision gets a case from every model spec.

Thin on purpose: one task per model, each calling the idempotent `Annotator`, retried with
backoff while Triton, Orthanc or the disk is unavailable (`annotation.retries`). A draft that
cannot be made — bad input, or an outage that outlasts the retries — still leaves the study on
the worklist: the flow queues it without a draft, with the reason. Deployed by `radloop flows
serve` with an event trigger on `radloop.study.completed`; parameters are UIDs and a revision
only.
"""

from __future__ import annotations

import httpx
from prefect import flow, task
from prefect.tasks import exponential_backoff
from pyorthanc import Orthanc

from agents.annotator import Annotator, failure_reason
from agents.viewer_store import ViewerStoreUnavailable
from flows.ghosts import ANNOTATE_FLOW
from flows.process import mark_this_run
from model_registry.inference import InferenceUnavailable, TritonBackend
from model_registry.repository import TritonRepository
from radloop.db import Store
from radloop.modelspec import load_specs
from radloop.settings import Settings, load_settings

RETRYABLE = (InferenceUnavailable, ViewerStoreUnavailable, httpx.HTTPError, OSError)


def _retry_when_unavailable(task: object, task_run: object, state: object) -> bool:
    """Retry outages (Triton, Orthanc, disk), not bad input."""
    try:
        state.result()  # type: ignore[attr-defined]
    except RETRYABLE:
        return True
    except Exception:
        return False
    return False


def build_annotator(settings: Settings, store: Store) -> Annotator:
    orthanc = settings.orthanc
    return Annotator(
        store,
        settings.spool_dir,
        settings.drafts_dir,
        TritonRepository(settings.model_repository),
        TritonBackend(settings.triton.base_url, settings.triton.timeout_seconds),
        Orthanc(
            orthanc.base_url,
            orthanc.username,
            orthanc.password.get_secret_value() if orthanc.password else None,
            timeout=60.0,
        ),
    )


@task(
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_when_unavailable,
    task_run_name="annotate {study_uid} rev {revision} with {model}",
)
def annotate_with_model(study_uid: str, revision: int, model: str) -> dict[str, object]:
    settings = load_settings()
    store = Store.open(settings.effective_database_url)
    try:
        spec = load_specs(settings.effective_models_dir)[model]
        outcome = build_annotator(settings, store).annotate(study_uid, revision, spec)
    finally:
        store.close()
    return {"annotation_id": outcome.annotation_id, "state": outcome.state.value}


@task(task_run_name="queue {study_uid} rev {revision} for {model} without a draft")
def queue_without_draft(
    study_uid: str, revision: int, model: str, reason: str
) -> dict[str, object]:
    settings = load_settings()
    store = Store.open(settings.effective_database_url)
    try:
        spec = load_specs(settings.effective_models_dir)[model]
        outcome = build_annotator(settings, store).queue_failed(study_uid, revision, spec, reason)
    finally:
        store.close()
    return {"annotation_id": outcome.annotation_id, "state": outcome.state.value}


@flow(name=ANNOTATE_FLOW)
def annotate_study(study_uid: str, revision: int) -> list[dict[str, object]]:
    """Annotate study revision `revision` with every model radloop has a spec for."""
    mark_this_run()
    settings = load_settings()
    attempt = annotate_with_model.with_options(
        retries=settings.annotation.retries,
        retry_delay_seconds=exponential_backoff(
            backoff_factor=settings.annotation.retry_delay_seconds
        )(settings.annotation.retries),
    )
    outcomes = []
    for name in load_specs(settings.effective_models_dir):
        state = attempt(study_uid, revision, name, return_state=True)
        if state.is_completed():
            outcomes.append(state.result())
            continue
        error = state.result(raise_on_failure=False)
        reason = (
            failure_reason(error)
            if isinstance(error, BaseException)
            else f"draft failed: {state.message}"
        )
        outcomes.append(queue_without_draft(study_uid, revision, name, reason))
    return outcomes
