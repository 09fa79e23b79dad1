"""Flow `annotate-study`: every completed study revision gets a draft from every model spec.

Thin on purpose: one task per model, each calling the idempotent `Annotator`, retried with
backoff while Triton or Orthanc is unavailable. Deployed by `radloop flows serve` with an
event trigger on `radloop.study.completed`; parameters are UIDs and a revision only.
"""

from __future__ import annotations

import httpx
from prefect import flow, task
from prefect.tasks import exponential_backoff
from pyorthanc import Orthanc

from agents.annotator import Annotator
from agents.inference import InferenceUnavailable, TritonBackend
from model_registry.repository import TritonRepository
from radloop.db import Store
from radloop.modelspec import load_specs
from radloop.settings import Settings, load_settings

RETRYABLE = (InferenceUnavailable, httpx.HTTPError, OSError)


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
        Orthanc(orthanc.base_url, orthanc.username, orthanc.password, timeout=60.0),
    )


@task(
    retries=8,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
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


@flow(name="annotate-study")
def annotate_study(study_uid: str, revision: int) -> list[dict[str, object]]:
    """Annotate study revision `revision` with every model radloop has a spec for."""
    settings = load_settings()
    return [
        annotate_with_model(study_uid, revision, name)
        for name in load_specs(settings.effective_models_dir)
    ]
