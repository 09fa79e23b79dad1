"""A reader in a real browser (Debian's Chromium, driven by Playwright) on `radloop up`, with
studies that came the product's way: one pushed with dcmtk's storescu (its files without the
Type 2 patient attributes de-identified exports omit), one dropped into the watch folder. The
product drafts both; the reader logs in and sees the worklist in the strategy's order.
- The pushed case opens in OHIF's segmentation mode: its CT renders, the draft SEG loads, a
  brush stroke saved with OHIF's own Export → DICOM SEG → Save makes it a correction.
- The dropped case opens with "Open with AI tools" in the OHIF build with MONAI Label's panel:
  its CT renders, the panel connects to radloop's `/monailabel/` by itself, its auto
  segmentation shows the draft and a Liver click with its point prompts is refined by the
  interactive model on Triton; the worklist's "Accept refined label" makes it a correction.
A study whose draft cannot be made (Triton lost the model) is on the worklist with its reason.
The test never talks to Orthanc. Screenshots of each step are kept under
`test-artifacts/browser-<database>/`."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import tritonclient.http as triton_http

from radloop.app.phantoms import WrittenStudy, write_study
from radloop.app.viewer_snapshot import (
    CHROMIUM,
    chromium_page,
    load_draft,
    log_in,
    open_from_worklist,
    wait_for_image,
)
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import PROJECT_ROOT, Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE, STACK
from tests.drafted import strip_attributes
from tests.models import export_interactive, export_version
from tests.servers import RadloopProcess, radloop_json
from tests.test_scp import storescu
from tests.test_viewer_store import TYPE2_REMOVED

ARTIFACTS = Path(os.environ.get("RADLOOP_TEST_ARTIFACTS", PROJECT_ROOT / "test-artifacts"))

pytestmark = [
    pytest.mark.slow,
    STACK,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed (make install does it)"
    ),
    # One `radloop up` with every part: the database-specific paths run in test_review/test_up.
    ONCE,
    # Start-up, three drafts, three viewers and a failed draft's retries take 5-7 minutes.
    pytest.mark.timeout(900),
]


def case_of(env: dict[str, str], study: WrittenStudy) -> dict[str, Any] | None:
    for row in radloop_json(env, "queue", "list"):
        if row["study_uid"] == study.study_uid:
            return dict(row)
    return None


@ONCE  # a browser on OHIF; the worklist's SQL runs on PostgreSQL in test_review
def test_studies_pushed_and_dropped_open_in_ohif_with_their_ct_and_draft_and_a_save_corrects(
    radloop_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    shots = ARTIFACTS / f"browser-{os.environ.get('RADLOOP_TEST_DATABASE', 'sqlite')}"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    export_interactive(settings, spec)  # `radloop up` loads it into Triton beside the task's
    # Outages give up fast here, so the failed draft below is queued within seconds.
    env = {
        **radloop_env,
        "RADLOOP_ANNOTATION__RETRIES": "1",
        "RADLOOP_ANNOTATION__RETRY_DELAY_SECONDS": "1",
    }
    up = RadloopProcess(env, command=("up",)).start(timeout=240)
    try:
        pushed = write_study(tmp_path / "phantoms", 0, seed=71)
        pushed_files = sorted(pushed.dicom_dir.glob("*.dcm"))
        strip_attributes(pushed_files, TYPE2_REMOVED)
        assert storescu(env, pushed_files).returncode == 0
        dropped = write_study(tmp_path / "phantoms", 1, seed=72)
        shutil.copytree(dropped.dicom_dir, Path(env["RADLOOP_DATA_DIR"]) / "incoming" / "ct")

        def both_viewable() -> list[dict[str, Any]] | None:
            rows = {row["study_uid"]: row for row in radloop_json(env, "queue", "list")}
            cases = [rows.get(pushed.study_uid), rows.get(dropped.study_uid)]
            if all(c and c["state"] == "drafted" and c["viewable"] for c in cases):
                return cases  # type: ignore[return-value]
            return None

        pushed_case, dropped_case = wait_until(both_viewable, timeout=300, interval=2)
        reader = radloop_json(env, "users", "add", "ann", "--role", "reader")

        with chromium_page() as page:
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:500]))
            base = settings.review.base_url
            log_in(page, base, "ann", reader["token"])
            rows = page.locator("#worklist tbody tr")
            order = [int(a) for a in rows.evaluate_all("rs => rs.map(r => r.dataset.annotation)")]
            by_rank = sorted((pushed_case, dropped_case), key=lambda c: c["rank"])
            assert order == [c["annotation_id"] for c in by_rank]
            page.screenshot(path=shots / "1-worklist.png")

            # The study pushed over C-STORE: its CT renders, its draft loads, an edit saves.
            open_from_worklist(page, base, pushed_case["annotation_id"])
            assert pushed.study_uid in page.url
            lit = wait_for_image(page)
            page.screenshot(path=shots / "2-ohif-ct-pushed.png")
            assert lit > 0.05, "\n".join(console[-20:])
            load_draft(page, [label.name for label in spec.labels])
            page.screenshot(path=shots / "3-draft-seg-loaded.png")
            save_a_brush_stroke(page, shots, console)

            def corrected() -> dict[str, Any] | None:
                rows = radloop_json(env, "queue", "list", "--all")
                (row,) = [r for r in rows if r["annotation_id"] == pushed_case["annotation_id"]]
                return dict(row) if row["state"] == "corrected" else None

            correction = wait_until(corrected, timeout=30)
            assert correction["corrected_by"] == "ann"
            assert 0.0 < correction["correction_dice"] < 1.0
            page.goto(f"{base}/worklist")
            page.locator("#corrected").wait_for()
            assert page.locator(f"#corrected tr[data-annotation='{correction['annotation_id']}']")
            page.screenshot(path=shots / "7-worklist-after.png")

            # The study dropped into the watch folder, with AI tools: MONAI Label's panel.
            refine_with_ai_tools(page, base, dropped_case["annotation_id"], shots, console)
            assert dropped.study_uid in page.url
            page.goto(f"{base}/worklist")
            row = page.locator(f"#worklist tr[data-annotation='{dropped_case['annotation_id']}']")
            row.get_by_role("button", name="Accept refined label").click()
            page.locator("#corrected").wait_for()
            page.screenshot(path=shots / "11-accepted-refinement.png")
            refined = next(
                r
                for r in radloop_json(env, "queue", "list", "--all")
                if r["annotation_id"] == dropped_case["annotation_id"]
            )
            assert (refined["state"], refined["corrected_by"]) == ("corrected", "ann")
            assert refined["correction_dice"] < 1.0  # the click changed the draft near it

            # Triton loses the model for good (its file is damaged, so no reload brings it
            # back): the next study's draft fails, and the study waits on the worklist with
            # the reason instead of vanishing.
            (settings.model_repository / spec.name / "1" / "model.pt").write_bytes(b"damaged")
            triton_http.InferenceServerClient(
                settings.triton.base_url.split("://", 1)[1]
            ).unload_model(spec.name)
            failing = write_study(tmp_path / "phantoms", 2, seed=73)
            assert storescu(env, sorted(failing.dicom_dir.glob("*.dcm"))).returncode == 0

            def queued_with_reason() -> dict[str, Any] | None:
                found = case_of(env, failing)
                return found if found and found["reason"] and found["viewable"] else None

            failed = wait_until(queued_with_reason, timeout=180, interval=2)
            assert failed["state"] == "queued" and failed["seg_sop_instance_uid"] is None
            assert failed["reason"].startswith("draft failed (infer): InferenceUnavailable")
            page.goto(f"{base}/worklist")
            row = page.locator(f"#worklist tr[data-annotation='{failed['annotation_id']}']")
            assert "draft failed (infer)" in row.inner_text()
            page.screenshot(path=shots / "12-worklist-failed-draft.png")
            open_from_worklist(page, base, failed["annotation_id"])
            wait_for_image(page)  # readers label it from scratch on its images
            page.screenshot(path=shots / "13-ohif-ct-without-draft.png")
    finally:
        code = up.stop(sig=signal.SIGINT, timeout=60)
    assert code == 0, up.output()


def save_a_brush_stroke(page: Any, shots: Path, console: list[str]) -> None:
    """Paint a stroke with OHIF's brush, then save with OHIF's own export (a STOW-RS)."""
    page.click("[data-cy=Brush-btn]")
    viewport = page.locator("[data-cy=viewport-pane]").first.bounding_box()
    assert viewport is not None
    x, y = viewport["x"] + viewport["width"] * 0.4, viewport["y"] + viewport["height"] * 0.5
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + viewport["width"] * 0.2, y, steps=20)
    page.mouse.up()
    page.screenshot(path=shots / "4-corrected.png")
    page.click("[data-cy=segmentation-collapsed-more-btn-Labelmap]")
    page.get_by_text("Export", exact=True).hover()
    page.get_by_text("DICOM SEG", exact=True).click()
    page.get_by_text("Store Segmentation", exact=True).wait_for()
    page.wait_for_timeout(1000)  # the dialog fades in; a click before lands on nothing
    page.screenshot(path=shots / "5-store-dialog.png")
    with page.expect_response(
        lambda r: r.request.method == "POST" and "/dicom-web/studies" in r.url, timeout=60_000
    ) as stow:
        page.get_by_role("button", name="Save", exact=True).click()
    page.screenshot(path=shots / "6-saved.png")
    assert stow.value.status == 200, "\n".join(console[-20:])


def refine_with_ai_tools(
    page: Any, base: str, annotation_id: int, shots: Path, console: list[str]
) -> None:
    """Open the case with AI tools, connect MONAI Label's panel, run its auto segmentation
    (the draft) and refine with one Liver click; each answered 200 by radloop."""
    page.goto(f"{base}/worklist")
    row = page.locator(f"#worklist tr[data-annotation='{annotation_id}']")
    row.get_by_role("button", name="Open with AI tools").click()
    page.wait_for_url("**/ohif/monai-label?StudyInstanceUIDs=*")
    lit = wait_for_image(page)
    assert lit > 0.05, "\n".join(console[-20:])
    banner = page.get_by_role("button", name="Confirm and Hide")
    if banner.count():
        banner.click()
    panel = page.locator(".monaiLabelPanel")
    # The server field holds radloop's /monailabel/ from the page's cookie: connect.
    assert panel.locator("input").first.input_value().endswith("/monailabel/")
    with page.expect_response(lambda r: r.url.endswith("/monailabel/info/")) as info:
        panel.locator("button").first.click()
    assert info.value.status == 200
    page.screenshot(path=shots / "8-ohif-ai-connected.png")

    def inference(model: str) -> Any:
        return page.expect_response(
            lambda r: r.request.method == "POST" and f"/monailabel/infer/{model}?" in r.url,
            timeout=120_000,
        )

    panel.get_by_text("Experience fully automated").wait_for()
    with inference("phantom-abdomen") as auto:
        panel.get_by_text("Run", exact=True).first.click()
    assert auto.value.status == 200, "\n".join(console[-20:])
    page.wait_for_timeout(1500)  # the labelmap is drawn after the answer is parsed
    page.screenshot(path=shots / "9-ohif-ai-auto-segmentation.png")

    # The panel switches OHIF's tool to its click probe when an organ is picked; a click
    # before that, or a Run before the click is kept, sends nothing.
    panel.get_by_text("Point Prompts", exact=True).click()
    page.wait_for_timeout(1000)
    panel.locator("tr.clickable-row", has_text="Liver").click()
    page.wait_for_timeout(1000)
    viewport = page.locator("[data-cy=viewport-pane]").first.bounding_box()
    assert viewport is not None
    x, y = viewport["x"] + viewport["width"] * 0.4, viewport["y"] + viewport["height"] / 2
    page.mouse.click(x, y)
    page.wait_for_timeout(1000)
    with inference("phantom-abdomen-deepedit") as refined:
        panel.get_by_text("Run", exact=True).nth(1).click()
    assert refined.value.status == 200, "\n".join(console[-20:])
    page.wait_for_timeout(1500)
    page.screenshot(path=shots / "10-ohif-ai-liver-click.png")
