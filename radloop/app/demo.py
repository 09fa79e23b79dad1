"""`radloop demo`: turn the whole loop once on phantoms, through the real parts.

Phantom CT studies go over real C-STORE to the listener; Prefect's trigger drafts them with the
Triton-served model; a simulated reader corrects each draft towards the phantom's ground truth
and a simulated reviewer validates it, both through the review service's REST API as any
client would; the validated labels trigger retraining (MLflow run, holdout gate, hot reload);
a second batch is drafted by the new version. The terminal shows each step; the summary gives
versions, holdout Dice, correction effort per version and the pages to look at.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydicom import dcmread
from pynetdicom import AE
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from radloop.app.phantoms import WrittenStudy, write_study
from radloop.db import Annotation, Store, Study, TrainingRun
from radloop.domain import Role, TrainingState
from radloop.modelspec import load_specs
from radloop.settings import Settings
from radloop.wait import WaitTimeout, wait_until

MODEL = "phantom-abdomen"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FIRST_BATCH = 8
SECOND_BATCH = 3
T = TypeVar("T")


class DemoFailed(RuntimeError):
    pass


@dataclass
class Reader:
    """A client of the review API with one user's token."""

    base_url: str
    token: str

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = httpx.request(
            method,
            f"{self.base_url}{path}",
            headers={"authorization": f"Bearer {self.token}"},
            timeout=120,
            verify=not self.base_url.startswith("https://"),  # radloop's own, on this host
            **kwargs,
        )
        if answer.status_code >= 400:
            raise DemoFailed(f"{method} {path}: {answer.status_code} {answer.text}")
        return answer.json()


def wait_for(what: str, check: Callable[[], T | None], timeout: float, console: Console) -> T:
    with console.status(what):
        try:
            return wait_until(check, timeout, 1.0, what)
        except WaitTimeout:
            raise DemoFailed(f"timed out after {timeout:.0f} s: {what}") from None


class Demo:
    def __init__(self, settings: Settings, store: Store, console: Console) -> None:
        self.settings = settings
        self.store = store
        self.console = console
        self.spec = load_specs(settings.effective_models_dir)[MODEL]
        self.root = settings.data_dir / "demo" / "phantoms"
        self.review_url = settings.review.local_url

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]demo[/bold cyan] {text}")

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        with self.store.read() as session:
            self.runs_before = session.scalar(select(func.max(TrainingRun.id))) or 0
        self.starter_model()
        reader, reviewer = self.users()
        first = self.push(range(FIRST_BATCH), seed=500)
        self.wait_drafted(first)
        self.correct(first, reader, reviewer)
        run = self.wait_retrained()
        if run["state"] == "promoted":
            self.say(
                f"[green]v{run['triton_version']} promoted[/green] and hot-reloaded into Triton "
                f"({run['decision']})"
            )
        else:
            self.say(f"[yellow]challenger not promoted[/yellow]: {run['decision']}")
        second = self.push(range(FIRST_BATCH, FIRST_BATCH + SECOND_BATCH), seed=500)
        drafted = self.wait_drafted(second)
        versions = sorted({str(a["model_version"]) for a in drafted})
        self.say(f"new drafts from version {', '.join(versions)}")
        screenshot = self.screenshot(drafted[0]["annotation_id"], reader)
        self.correct(second, reader, reviewer, retrain_expected=False)
        summary = self.summary(time.monotonic() - started)
        summary["screenshot"] = str(screenshot) if screenshot else None
        if screenshot:
            self.console.print(f"  what a reader sees (OHIF, CT + draft): {screenshot}")
        return summary

    # -- steps ----------------------------------------------------------------------------

    def starter_model(self) -> None:
        from agents.trainer import TrainingConfig, prepare, train
        from model_registry.inference import TritonBackend
        from model_registry.mlflow_registry import Registry, adopt
        from model_registry.repository import model_repository
        from radloop.app.phantoms import generate

        repository = model_repository(self.settings)
        if repository.champion(MODEL) is None:
            self.say("training a starter model on 6 phantoms (a weak first version) ...")
            phantoms = [generate(100 + i) for i in range(6)]
            examples = [prepare(p.hu, p.labels, p.spacing, self.spec) for p in phantoms]
            network, _ = train(
                self.spec, examples, TrainingConfig(epochs=6, steps_per_epoch=8, seed=1)
            )
            import torch

            repository.export(self.spec, torch.jit.script(network))
            TritonBackend(self.settings.triton.base_url).load(MODEL)
        version = repository.champion(MODEL)
        if version is None:
            raise DemoFailed(
                f"no version of {MODEL} in {repository.store.url()} after the starter model"
            )
        with repository.version_folder(MODEL, version) as folder:
            adopt(
                Registry(self.settings.mlflow.effective_tracking_uri),
                MODEL,
                folder,
                version,
                "radloop demo starter model",
            )
        self.say(f"Triton serves {MODEL} v{version}")

    def users(self) -> tuple[Reader, Reader]:
        from agents.review.auth import UserExists, Users

        users = Users(self.store)
        tokens = {}
        for name, role in (("demo-reader", Role.READER), ("demo-reviewer", Role.REVIEWER)):
            try:
                tokens[name] = users.add(name, role)
            except UserExists:
                tokens[name] = users.rotate_token(name)
        return Reader(self.review_url, tokens["demo-reader"]), Reader(
            self.review_url, tokens["demo-reviewer"]
        )

    def push(self, indices: range, seed: int) -> list[WrittenStudy]:
        studies = [write_study(self.root, index, seed=seed + index) for index in indices]
        dicom = self.settings.dicom
        ae = AE(ae_title="DEMO")
        ae.add_requested_context(CT_IMAGE_STORAGE)
        assoc = ae.associate(dicom.host, dicom.port, ae_title=dicom.ae_title)
        if not assoc.is_established:
            raise DemoFailed("the DICOM listener refused the demo's association")
        try:
            for study in studies:
                for path in sorted(study.dicom_dir.glob("*.dcm")):
                    status = assoc.send_c_store(dcmread(path))
                    if getattr(status, "Status", None) != 0:
                        raise DemoFailed(f"C-STORE of {path.name} failed: {status}")
        finally:
            assoc.release()
        slices = sum(study.slices for study in studies)
        self.say(f"pushed {len(studies)} phantom studies ({slices} CT slices) over C-STORE")
        return studies

    def wait_drafted(self, studies: list[WrittenStudy]) -> list[dict[str, Any]]:
        uids = [study.study_uid for study in studies]

        def drafted() -> list[dict[str, Any]] | None:
            with self.store.read() as session:
                rows = session.execute(
                    select(Annotation.id, Annotation.model_version, Study.study_uid)
                    .join(Study, Study.id == Annotation.study_id)
                    .where(
                        Study.study_uid.in_(uids),
                        Annotation.seg_sop_instance_uid.is_not(None),
                        # Offered to readers only once its images are in the viewer's Orthanc.
                        Annotation.viewable_at.is_not(None),
                    )
                ).all()
            found = {uid: (i, v) for i, v, uid in rows}
            if len(found) < len(uids):
                return None
            return [
                {"annotation_id": found[u][0], "model_version": found[u][1], "study_uid": u}
                for u in uids
            ]

        result = wait_for(
            f"waiting for {len(uids)} studies to complete and be drafted (Prefect → Triton)",
            drafted,
            600,
            self.console,
        )
        self.say(f"{len(result)} drafts in the worklist")
        return result

    def screenshot(self, annotation_id: int, reader: Reader) -> Path | None:
        """Open one drafted case in OHIF as the demo reader (headless Chromium) and save what
        they see next to the summary; a missing browser only skips the picture."""
        from radloop.app.viewer_snapshot import snapshot_case

        out = self.settings.data_dir / "demo" / f"reader-view-case-{annotation_id}.png"
        try:
            with self.console.status(f"opening case {annotation_id} in OHIF (headless Chromium)"):
                snapshot_case(
                    self.review_url,
                    "demo-reader",
                    reader.token,
                    annotation_id,
                    [label.name for label in self.spec.labels],
                    out,
                )
        except Exception as error:  # the loop has turned; the picture is a bonus
            self.say(
                f"[yellow]no screenshot of the viewer[/yellow]: {type(error).__name__}: {error}"
            )
            return None
        self.say(f"case {annotation_id} opened in OHIF with its CT and draft: {out}")
        return out

    def correct(
        self,
        studies: list[WrittenStudy],
        reader: Reader,
        reviewer: Reader,
        retrain_expected: bool = True,
    ) -> None:
        by_uid = {study.study_uid: study for study in studies}
        queue = [
            item for item in reader.call("GET", "/api/worklist") if item["study_uid"] in by_uid
        ]
        for item in queue:  # most informative first, as a radiologist would take them
            case = item["annotation_id"]
            reader.call("POST", f"/api/annotations/{case}/claim")
            truth = Path(by_uid[item["study_uid"]].truth).read_bytes()
            corrected = reader.call("PUT", f"/api/annotations/{case}/label", content=truth)
            validated = reviewer.call("POST", f"/api/annotations/{case}/validate")
            effort = 1.0 - corrected["correction_dice"]
            self.say(
                f"case {case} (v{item['model_version']}, rank {item['rank']} by "
                f"{item['selection']['strategy']}): "
                f"corrected, effort 1−Dice {effort:.3f}, validated"
                + (" → holdout" if self._split_of(case) == "holdout" else "")
            )
            if validated["state"] != "validated":
                raise DemoFailed(f"case {case} is {validated['state']} after validation")

    def _split_of(self, annotation_id: int) -> str | None:
        from radloop.db import Label

        with self.store.read() as session:
            return session.scalar(select(Label.split).where(Label.annotation_id == annotation_id))

    def wait_retrained(self) -> dict[str, Any]:
        self.say(
            f"threshold of {self.spec.retraining.threshold} new train labels reached: "
            "radloop.label.validated triggers retraining"
        )
        last_epoch = [0]

        def decided() -> dict[str, Any] | None:
            with self.store.read() as session:
                row = session.scalars(
                    select(TrainingRun)
                    .where(
                        TrainingRun.model_name == MODEL,
                        TrainingRun.id > self.runs_before,
                        TrainingRun.state != TrainingState.SKIPPED.value,
                    )
                    .order_by(TrainingRun.id.desc())
                ).first()
                if row is None:
                    return None
                if row.epoch != last_epoch[0] and row.loss is not None:
                    last_epoch[0] = row.epoch
                    self.say(
                        f"training run {row.id}: epoch {row.epoch}/{row.epochs} loss {row.loss:.4f}"
                    )
                if row.state == TrainingState.RUNNING:
                    return None
                return {
                    "state": row.state,
                    "decision": row.decision,
                    "triton_version": row.triton_version,
                    "mlflow_version": row.mlflow_version,
                }

        return wait_for(
            "retraining (Prefect flow → MLflow → gate → Triton)", decided, 900, self.console
        )

    def summary(self, seconds: float) -> dict[str, Any]:
        from model_registry.mlflow_registry import Registry
        from model_registry.repository import model_repository

        registry = Registry(self.settings.mlflow.effective_tracking_uri)
        served = model_repository(self.settings).champion(MODEL)
        with self.store.read() as session:
            effort: dict[str | None, float] = dict(
                session.execute(
                    select(Annotation.model_version, func.avg(1.0 - Annotation.correction_dice))
                    .where(Annotation.model_name == MODEL, Annotation.correction_dice.is_not(None))
                    .group_by(Annotation.model_version)
                ).all()
            )
        versions: list[dict[str, Any]] = []
        for entry in registry.versions(MODEL):
            triton = entry.triton_version
            versions.append(
                {
                    "mlflow_version": entry.version,
                    "triton_version": triton,
                    "aliases": entry.aliases,
                    "holdout_dice": entry.holdout_dice,
                    "correction_effort": effort.get(str(triton)) if triton else None,
                    "served": triton == served,
                }
            )
        table = Table(title=f"radloop demo: the loop turned once in {seconds / 60:.1f} min")
        for column in ("MLflow", "Triton", "aliases", "holdout Dice", "effort (1−Dice)", "served"):
            table.add_column(column)
        for row in versions:
            table.add_row(
                row["mlflow_version"],
                str(row["triton_version"] or "—"),
                ",".join(row["aliases"]),
                "—" if row["holdout_dice"] is None else f"{row['holdout_dice']:.3f}",
                "—" if row["correction_effort"] is None else f"{row['correction_effort']:.3f}",
                "yes" if row["served"] else "",
            )
        self.console.print(table)
        review = self.settings.review.base_url
        pages = {
            "worklist": f"{review}/worklist",
            "dashboard": f"{review}/dashboard",
            "OHIF": f"{review}/",
            "MLflow": self.settings.mlflow.effective_tracking_uri,
            "Prefect": self.settings.prefect.effective_api_url.removesuffix("/api"),
        }
        for name, url in pages.items():
            self.console.print(f"  {name:10} {url}")
        self.console.print(
            "  log in to the worklist: radloop users add NAME --role reader --password"
        )
        return {"seconds": seconds, "served_version": served, "versions": versions, "pages": pages}
