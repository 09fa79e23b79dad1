"""The in-process services of a radloop process (listener, completion, outbox dispatcher,
Orthanc follower, watch folder, viewer-store reconciler), built from settings and run as
threads that share one store and one stop signal."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Mapping

import httpx
from pyorthanc import Orthanc

from agents.jobs import AnnotationJobs, JobPlanner, JobRef
from agents.outbox import OutboxDispatcher
from agents.viewer_store import ViewerStore
from dicom_listener import (
    Ingestor,
    OrthancFollower,
    StoreServer,
    StudyAssembler,
    WatchFolder,
    build_server,
)
from model_registry.inference import TritonBackend
from model_registry.repository import model_repository
from radloop.db import Store
from radloop.modelspec import ModelSpec
from radloop.settings import Settings

log = logging.getLogger(__name__)


class Services:
    """In-process services sharing one store and one stop signal."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.stop_event = threading.Event()
        self.ingestor = Ingestor(store, settings.spool_dir)
        self.assembler = StudyAssembler(store, settings.dicom.quiet_seconds)
        self._threads: list[threading.Thread] = []
        self._server: StoreServer | None = None

    def _spawn(self, name: str, target: Callable[[threading.Event], None]) -> None:
        # A copy of the context: Prefect's settings (`prefect_client`) reach the thread.
        thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(target, self.stop_event),
            name=name,
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def start_listener(self) -> None:
        """The C-STORE SCP and the study completion loop."""
        dicom = self.settings.dicom
        self._server = build_server(dicom, self.ingestor)
        self._server.serve_in_background()
        self._spawn("assembly", self.assembler.run)
        log.info(
            "DICOM listener %s on %s:%d%s",
            dicom.ae_title,
            dicom.host,
            dicom.port,
            " (TLS)" if dicom.tls else "",
        )

    def start_dispatcher(self, specs: Mapping[str, ModelSpec]) -> None:
        """Deliver the outbox to Prefect; plan each completed study's annotation jobs and
        submit them (and again those whose lease ran out) to the annotation workers."""
        from flows.annotate import submit_annotation
        from flows.storage import save_storage_block

        outbox = self.settings.outbox
        repository = model_repository(self.settings)

        def serving() -> dict[str, str | None]:
            versions = {name: repository.champion(name) for name in specs}
            return {name: None if v is None else str(v) for name, v in versions.items()}

        def submit(job: JobRef) -> str:
            save_storage_block(self.settings)  # once; while Prefect is away, the next try
            return submit_annotation(job)

        jobs = AnnotationJobs(self.store, self.settings.annotation.job_lease_seconds)
        dispatcher = OutboxDispatcher(
            self.store,
            self.settings.prefect.effective_api_url,
            batch_size=outbox.batch_size,
            max_backoff_seconds=outbox.max_backoff_seconds,
            lease_seconds=outbox.lease_seconds,
            planner=JobPlanner(jobs, serving, submit),
        )
        self.assembler.on_complete = dispatcher.wake  # a completed study is submitted at once
        self._spawn("outbox", lambda stop: dispatcher.run(stop, outbox.poll_seconds))

    def _orthanc(self) -> Orthanc:
        orthanc = self.settings.orthanc
        # Orthanc closes idle HTTP connections after about a second, the poll interval: drop
        # them sooner on this side rather than reuse one that is being closed.
        return Orthanc(
            orthanc.base_url,
            orthanc.username,
            orthanc.password.get_secret_value() if orthanc.password else None,
            timeout=60.0,
            limits=httpx.Limits(keepalive_expiry=0.5),
        )

    def start_follower(self) -> None:
        orthanc = self.settings.orthanc
        follower = OrthancFollower(
            self.store,
            self.ingestor,
            self.assembler,
            self._orthanc(),
            orthanc.poll_seconds,
            rejected_folder=self.settings.rejected_folder,
        )
        self._spawn("orthanc-follower", follower.run)
        log.info("following Orthanc changes at %s", orthanc.base_url)

    def start_viewer_reconciler(self) -> None:
        """Store the images of cases that are not yet viewable (Orthanc was down when the
        annotation flow gave up), so every queued case reaches the viewer in the end."""
        viewer = ViewerStore(self.store, self.settings.spool_dir, self._orthanc())
        interval = self.settings.annotation.viewer_retry_seconds
        self._spawn("viewer-store", lambda stop: viewer.run(stop, interval))

    def start_watch(self) -> None:
        watch = WatchFolder(
            self.settings.watch_folder,
            self.settings.rejected_folder,
            self.ingestor,
            self.settings.watch.settle_seconds,
        )
        self._spawn("watch-folder", watch.run)
        log.info("watching %s", self.settings.watch_folder)

    def stop(self) -> None:
        self.stop_event.set()
        if self._server is not None:
            self._server.stop()
        for thread in self._threads:
            thread.join(timeout=10)


def load_served_models(settings: Settings, specs: dict[str, ModelSpec]) -> None:
    """Ask Triton (explicit model control) to load every spec'd model that has a version, and
    each task's interactive model that has one."""
    repository = model_repository(settings)
    backend = TritonBackend(settings.triton.base_url, settings.triton.timeout_seconds)
    names = [*specs, *(s.interactive_name for s in specs.values() if s.interactive_name)]
    for name in names:
        versions = repository.versions(name)
        if not versions and name not in specs:
            continue  # a site opts into the interactive model by bootstrapping one
        if not versions:
            log.info("model %s has no version yet: studies will be queued without a draft", name)
            continue
        backend.load(name)
        log.info("Triton serves %s version %d", name, versions[-1])
