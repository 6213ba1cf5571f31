"""The web UI's Comic tab in headless Chromium: a tiny storyboard typed into the editor, Draft
shows the contact sheet, Render shows the page and lists its files (PNG, PDF, CBZ). The screenshot
goes to $DANQING_UI_SCREENSHOT_DIR when set (docs/ui.md shows it)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest
from conftest import need, need_module
from PIL import Image
from server_helpers import LiveServer, make_app

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
T = 120_000  # ms

STORY = '''title = "Two panels"
steps = 3
seed = 11
hires_scale = 1
sampler = "Euler"

[characters.heart]
trigger = "a red heart"

[[panels]]
scene = "{heart} left of a blue circle"
caption = "one"

[[panels]]
scene = "{heart} right of a green square"
caption = "two"
'''


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    need(CHROMIUM is not None, "chromium at /usr/bin/chromium", "Debian: apt-get install -y chromium; .ci/run installs it")
    sync_api = need_module("playwright.sync_api", "pip install -e '.[test]'")
    with LiveServer(make_app(tmp_path_factory.mktemp("comic-ui"), ui=True)) as live, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
        pg.set_default_timeout(T)
        pg.goto(live.url + "/")
        pg.wait_for_selector("#txt2img_prompt textarea")
        pg.live = live
        yield pg
        browser.close()


def loaded_png(page, selector: str) -> Image.Image:
    """The picture an image element shows once it has loaded a file (not a streamed preview)."""
    page.wait_for_function("(s) => { const i = document.querySelector(s + ' img');"
                           " return i && i.complete && i.naturalWidth > 0 && /\\.png$/.test(i.src); }", arg=selector)
    src = page.locator(f"{selector} img").first.get_attribute("src")
    r = httpx.get(src if src.startswith("http") else page.live.url + src)
    assert r.status_code == 200, src
    return Image.open(io.BytesIO(r.content)).convert("RGB")


def wait_done(page) -> None:
    page.wait_for_function("() => document.querySelector('#comic_status textarea').value.startsWith('done')"
                           " || document.querySelector('.toast-body')")
    assert not page.locator(".toast-body").count(), page.locator(".toast-body").first.inner_text()


def test_the_comic_tab_drafts_and_renders_a_page(page):
    page.get_by_role("tab", name="Apps", exact=True).click()
    page.get_by_role("tab", name="Comic", exact=True).click()
    page.fill("#comic_project textarea", "two-panels")
    page.fill("#comic_storyboard textarea", STORY)
    page.click("#comic_draft")
    wait_done(page)
    sheet = loaded_png(page, "#comic_sheet")
    assert sheet.size[0] > 2 * 64 and sheet.size[1] > 64  # two drafts side by side, numbered
    page.click("#comic_render")
    wait_done(page)
    page_png = loaded_png(page, "#comic_page")
    assert page_png.size[0] > 2 * 64
    files = page.locator("#comic_files").inner_text().replace("\n", "")  # name and suffix in two spans
    assert "comic.pdf" in files and "comic.cbz" in files and "page-1.png" in files
    folder = os.environ.get("DANQING_UI_SCREENSHOT_DIR")
    if folder:
        page.screenshot(path=str(Path(folder) / "ui-comic.png"), full_page=True)
