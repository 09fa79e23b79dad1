"""Locust users for `bench/review_load.py`: readers of the review service.

Each simulated reader uses its own API token (one user each) and, with a few seconds of
thinking between steps, does what a radiologist's client does: reads the worklist and a case,
asks for the next case (`POST /api/worklist/next`, which claims it), uploads a corrected label
map for it, and goes back to the worklist. With no case left to claim it keeps reading.

The driver passes the tokens and the label of each case (the phantom's ground truth, a NIfTI on
the draft's grid) in the file named by `RADLOOP_LOAD_PLAN`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from locust import HttpUser, between, task

PLAN: dict[str, Any] = json.loads(Path(os.environ["RADLOOP_LOAD_PLAN"]).read_text())
_TOKENS: list[str] = list(PLAN["tokens"])
_LABELS: dict[str, str] = PLAN["labels"]  # study UID -> NIfTI path


class Reader(HttpUser):
    wait_time = between(1, 4)

    def on_start(self) -> None:
        self.client.headers["authorization"] = f"Bearer {_TOKENS.pop()}"
        self.seen: list[int] = []

    @task(6)
    def worklist(self) -> None:
        with self.client.get("/api/worklist", name="GET /api/worklist", catch_response=True) as r:
            if r.status_code == 200:
                self.seen = [item["annotation_id"] for item in r.json()]

    @task(3)
    def open_case(self) -> None:
        if self.seen:
            case = random.choice(self.seen)
            # 404: the case left the list (validated elsewhere) since it was read; a normal answer.
            with self.client.get(
                f"/api/annotations/{case}", name="GET /api/annotations/{id}", catch_response=True
            ) as r:
                if r.status_code in (200, 404):
                    r.success()

    @task(2)
    def correct_next(self) -> None:
        with self.client.post(
            "/api/worklist/next", name="POST /api/worklist/next", catch_response=True
        ) as r:
            if r.status_code == 404:  # "no case is waiting that you could open": the answer
                r.success()
                return
            if r.status_code != 200:
                return
            case = r.json()
        label = Path(_LABELS[case["study_uid"]]).read_bytes()
        self.client.put(
            f"/api/annotations/{case['annotation_id']}/label",
            data=label,
            name="PUT /api/annotations/{id}/label",
        )
