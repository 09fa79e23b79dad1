"""A reader in a real browser (Debian's Chromium, driven by Playwright): log in, see the
worklist in priority order, open a case in OHIF's segmentation mode, see the CT and the draft
SEG load, paint on it, save with OHIF's own Export → DICOM SEG → Save, and see the case become
a correction. Screenshots of each step are kept under `test-artifacts/browser-<database>/`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright
from pyorthanc import Orthanc

from agents.review.auth import Users
from radloop.db import Annotation, Store
from radloop.domain import Role
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import PROJECT_ROOT, Settings
from radloop.supervisor import Child
from tests.drafted import annotator, received_phantom
from tests.models import export_version
from tests.servers import wait_until

CHROMIUM = Path("/usr/bin/chromium")
# Headless Chromium on a machine without a GPU or network (see ../shared/TOOLCHAIN.md).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("RADLOOP_TEST_ARTIFACTS", PROJECT_ROOT / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (make install does it)"
)


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


def test_a_reader_opens_the_top_case_in_ohif_and_saves_a_correction(
    page: Page, settings: Settings, store: Store, review_service: Child, tmp_path: Path
) -> None:
    shots = ARTIFACTS / f"browser-{os.environ.get('RADLOOP_TEST_DATABASE', 'sqlite')}"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    export_version(settings, spec)
    orthanc = Orthanc(settings.orthanc.base_url)
    cases = []
    for seed in (71, 72):
        study = received_phantom(store, settings, tmp_path, seed=seed)
        for path in sorted(study.dicom_dir.glob("*.dcm")):
            orthanc.post_instances(path.read_bytes())
        outcome = annotator(store, settings, orthanc).annotate(study.study_uid, 1, spec)
        cases.append((outcome.annotation_id, study))
    with store.transaction() as session:  # the second case is the more uncertain one
        session.get_one(Annotation, cases[0][0]).priority = 0.1
        session.get_one(Annotation, cases[1][0]).priority = 0.9
    top_case, top_study = cases[1]
    Users(store).add("ann", Role.READER, password="reads-ct-all-day")

    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:500]))
    base = review_service.spec.url
    page.goto(f"{base}/worklist")
    page.fill("input[name=username]", "ann")
    page.fill("input[name=password]", "reads-ct-all-day")
    page.click("button[type=submit]")
    rows = page.locator("#worklist tbody tr")
    rows.first.wait_for()
    order = [int(a) for a in rows.evaluate_all("rs => rs.map(r => r.dataset.annotation)")]
    assert order == [top_case, cases[0][0]]
    page.screenshot(path=shots / "1-worklist.png")

    rows.first.get_by_role("button", name="Open").click()
    page.wait_for_url("**/segmentation?StudyInstanceUIDs=*")
    assert top_study.study_uid in page.url
    seg_thumbnail = page.locator("[data-cy=study-browser-thumbnail-no-image]")
    seg_thumbnail.wait_for(timeout=90_000)
    assert "radloop draft" in seg_thumbnail.inner_text()
    page.locator("[data-cy=viewport-pane] canvas").first.wait_for(timeout=90_000)
    page.screenshot(path=shots / "2-ohif-ct.png")
    banner = page.locator("[data-cy=confirm-and-hide-button]")
    if banner.count():
        banner.click()

    seg_thumbnail.dblclick()
    page.get_by_role("button", name="Yes").click()
    segments = page.get_by_text("Spleen", exact=True)
    segments.wait_for(timeout=60_000)
    for name in ("Liver", "Spleen", "Kidney"):
        assert page.get_by_text(name, exact=True).count() >= 1
    page.screenshot(path=shots / "3-draft-seg-loaded.png")

    # Paint a stroke with OHIF's brush, then save with OHIF's own export.
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

    def corrected() -> Annotation | None:
        with store.read() as session:
            found = session.get_one(Annotation, top_case)
            return found if found.state == "corrected" else None

    annotation = wait_until(corrected, timeout=30)
    assert annotation.corrected_by == "ann"
    assert annotation.correction_dice is not None and 0.0 < annotation.correction_dice < 1.0

    page.goto(f"{base}/worklist")
    page.locator("#corrected").wait_for()
    assert page.locator(f"#corrected tr[data-annotation='{top_case}']").count() == 1
    assert page.locator(f"#worklist tr[data-annotation='{top_case}']").count() == 0
    page.screenshot(path=shots / "7-worklist-after.png")
