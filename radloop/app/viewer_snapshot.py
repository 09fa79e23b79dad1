"""A reader's view of a case, taken in a real browser: Debian's Chromium, driven by Playwright,
logs in to the review service, opens the case from the worklist in OHIF's segmentation mode,
waits for the CT to render and loads the draft SEG.

`radloop demo` uses it to leave a screenshot of what a reader will see; the browser tests use
the same steps. Playwright never downloads a browser here: it drives /usr/bin/chromium.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

CHROMIUM = Path("/usr/bin/chromium")
# Headless Chromium on a machine without a GPU or network (see docs/operations.md).
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
# A viewport counts as showing an image when this share of its pixels is brighter than black
# (OHIF draws an empty viewport black; the text overlays cover far less than this).
IMAGE_SHARE = 0.05
_DARK = 30


class ViewerFailed(RuntimeError):
    pass


@contextmanager
def chromium_page(width: int = 1600, height: int = 1000) -> Iterator[Page]:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise ViewerFailed(f"{CHROMIUM} is not installed (make install installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def log_in(page: Page, base_url: str, user: str, password: str) -> None:
    """Log in on the review service's login page (a password, or the user's API token)."""
    page.goto(f"{base_url}/worklist")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.locator("#worklist").wait_for()


def open_from_worklist(page: Page, base_url: str, annotation_id: int) -> None:
    """Press the case's Open button on the worklist (claims it) and wait for OHIF."""
    page.goto(f"{base_url}/worklist")
    row = page.locator(f"#worklist tr[data-annotation='{annotation_id}']")
    row.get_by_role("button", name="Open", exact=True).click()
    page.wait_for_url("**/segmentation?StudyInstanceUIDs=*")


def image_share(viewport: Locator) -> float:
    """The share of the viewport's pixels that are not black, from a screenshot of it."""
    from PIL import Image

    picture = Image.open(io.BytesIO(viewport.screenshot())).convert("L")
    pixels = np.asarray(picture)
    return float((pixels > _DARK).mean())


def wait_for_image(page: Page, timeout_s: float = 120.0) -> float:
    """Wait until the first viewport shows an image; return its non-black share."""
    viewport = page.locator("[data-cy=viewport-pane]").first
    viewport.locator("canvas").first.wait_for(timeout=timeout_s * 1000)
    share = 0.0
    for _ in range(int(timeout_s)):
        share = image_share(viewport)
        if share >= IMAGE_SHARE:
            return share
        page.wait_for_timeout(1000)
    raise ViewerFailed(f"the viewport stayed black ({share:.1%} of it lit after {timeout_s:.0f} s)")


def load_draft(page: Page, labels: list[str], timeout_s: float = 90.0) -> None:
    """Double-click the radloop draft in OHIF's study browser and wait for its segments."""
    thumbnail = page.locator("[data-cy=study-browser-thumbnail-no-image]").filter(
        has_text="radloop draft"
    )
    thumbnail.first.wait_for(timeout=timeout_s * 1000)
    banner = page.locator("[data-cy=confirm-and-hide-button]")
    if banner.count():
        banner.click()
    thumbnail.first.dblclick()
    page.get_by_role("button", name="Yes").click()
    for name in labels:
        page.get_by_text(name, exact=True).first.wait_for(timeout=timeout_s * 1000)


def snapshot_case(
    base_url: str, user: str, password: str, annotation_id: int, labels: list[str], out: Path
) -> Path:
    """Open the case as `user` would and save a screenshot of the CT with its draft."""
    with chromium_page() as page:
        log_in(page, base_url, user, password)
        open_from_worklist(page, base_url, annotation_id)
        wait_for_image(page)
        load_draft(page, labels)
        page.wait_for_timeout(2000)  # the labelmap is drawn over the image after it loads
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=out)
    return out
