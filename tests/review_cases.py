"""The review service on a real store with real drafts, as the review tests drive it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from agents.review.app import create_app
from agents.review.auth import Users
from radloop.app.phantoms import WrittenStudy
from radloop.db import Store, utcnow
from radloop.domain import Role
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import Settings
from tests.drafted import annotator, received_phantom
from tests.models import export_version


@dataclass
class Review:
    settings: Settings
    store: Store
    spec: ModelSpec
    tokens: dict[str, str]
    tmp_path: Path
    # Added to the wall clock the service measures leases against: tests move time forward.
    skew: timedelta = timedelta(0)

    def now(self) -> datetime:
        return utcnow() + self.skew

    def app(self) -> FastAPI:
        return create_app(self.settings, self.store, {self.spec.name: self.spec}, self.now)

    def client(self, user: str | None = None) -> TestClient:
        client = TestClient(self.app(), follow_redirects=False)
        if user is not None:
            client.headers["authorization"] = f"Bearer {self.tokens[user]}"
        return client

    def drafted(self, seed: int) -> tuple[int, WrittenStudy]:
        """A phantom study with a draft from the model: (annotation id, study). The same
        seed twice gives two studies with the same images (new UIDs)."""
        study = received_phantom(self.store, self.settings, self.tmp_path, seed=seed)
        outcome = annotator(self.store, self.settings, None).annotate(study.study_uid, 1, self.spec)
        return outcome.annotation_id, study


@pytest.fixture
def review(settings: Settings, store: Store, tmp_path: Path) -> Review:
    """Users ann and bob (readers), rita (reviewer) and mo (ML engineer), and version 1 of the
    packaged phantom-abdomen model."""
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    users = Users(store)
    tokens = {
        "ann": users.add("ann", Role.READER),
        "bob": users.add("bob", Role.READER),
        "rita": users.add("rita", Role.REVIEWER),
        "mo": users.add("mo", Role.ML_ENGINEER),
    }
    return Review(settings, store, spec, tokens, tmp_path)
