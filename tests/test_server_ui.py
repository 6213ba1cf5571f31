"""The web UI in headless Chromium (Debian's chromium + the playwright package, never
``playwright install``): behind HTTP Basic, type a prompt, watch live progress and interrupt,
generate, see the image and its infotext, find it in the history gallery, read it back by
dropping the PNG on PNG Info, send it to img2img and run that. Screenshots go to the test's
temporary folder (and to $DANQING_UI_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import need, need_module
from server_helpers import LiveServer, make_app

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
need(CHROMIUM is not None, "chromium at /usr/bin/chromium", "Debian: apt-get install -y chromium; .ci/run installs it")
sync_api = need_module("playwright.sync_api", "pip install -e '.[test]'")
AUTH = ("painter", "brush-and-ink")
T = 60_000  # ms


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with LiveServer(make_app(tmp_path_factory.mktemp("ui-home"), ui=True, api_auth=":".join(AUTH))) as server:
        yield server


@pytest.fixture(scope="module")
def page(live):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(http_credentials={"username": AUTH[0], "password": AUTH[1]},
                                      viewport={"width": 1280, "height": 1400})
        pg = context.new_page()
        pg.set_default_timeout(T)
        pg.goto(live.url + "/")
        pg.wait_for_selector("#txt2img_prompt textarea")
        yield pg
        browser.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]") if page.locator(f"#{elem_id} input[type=number]").count() \
        else page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def _textarea_contains(page, elem_id: str, text: str) -> None:
    page.wait_for_function(
        "([id, text]) => { const t = document.querySelector(`#${id} textarea`); return t && t.value.includes(text); }",
        arg=[elem_id, text])


def _save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DANQING_UI_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["DANQING_UI_SCREENSHOT_DIR"]) / name)
    return path


def test_ui_needs_credentials(live):
    assert httpx.get(live.url + "/").status_code == 401
    assert httpx.get(live.url + "/", auth=AUTH).status_code == 200


def test_ui_live_progress_and_interrupt(page):
    page.fill("#txt2img_prompt textarea", "a slow blue square")
    for name, value in (("steps", 150), ("width", 64), ("height", 64), ("batch_count", 4)):
        _set_number(page, f"txt2img_{name}", value)
    page.click("#txt2img_generate")
    page.wait_for_function("() => document.querySelector('#txt2img_status').innerText.includes('step ')")
    page.wait_for_selector("#txt2img_gallery img")  # the live preview, drawn after a step
    assert page.locator("#txt2img_gallery img").count() >= 1
    running = re.search(r"step (\d+)/(\d+), batch (\d+)/(\d+)", page.locator("#txt2img_status").inner_text())
    assert running, page.locator("#txt2img_status").inner_text()
    step, total, batch, batches = map(int, running.groups())
    assert (total, batches) == (150, 4) and 1 <= step < total and batch == 1
    page.click("#txt2img_interrupt")
    page.wait_for_function("() => document.querySelector('#txt2img_status').innerText.includes('interrupted')")
    # The job ends early: "done (interrupted): N image(s) in Xs" with fewer images than the 4 batches.
    ended = re.fullmatch(r"done \(interrupted\): (\d+) image\(s\) in [\d.]+s",
                         page.locator("#txt2img_status").inner_text().strip())
    assert ended, page.locator("#txt2img_status").inner_text()
    assert int(ended.group(1)) < batches


def test_ui_generate_history_pnginfo_img2img(page, live, tmp_path):
    prompt = "a red circle left of a blue square"
    page.fill("#txt2img_prompt textarea", prompt)
    for name, value in (("steps", 20), ("width", 64), ("height", 64), ("batch_count", 1), ("seed", 7)):
        _set_number(page, f"txt2img_{name}", value)
    page.click("#txt2img_generate")
    _textarea_contains(page, "txt2img_infotext", "Seed: 7,")
    infotext = page.locator("#txt2img_infotext textarea").input_value()
    assert infotext.startswith(prompt + "\nSteps: 20,") and "Size: 64x64" in infotext
    page.wait_for_function("() => document.querySelector('#txt2img_status').innerText.startsWith('done')")
    src = page.locator("#txt2img_gallery img").first.get_attribute("src")
    png = httpx.get(src if src.startswith("http") else live.url + src, auth=AUTH)
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    page.wait_for_function("() => [...document.querySelectorAll('#txt2img_gallery img')].every("
                           "i => i.complete && i.naturalWidth > 0 && !i.src.startsWith('data:'))")
    _save_screenshot(page, tmp_path, "ui-txt2img.png")

    # History: search by prompt, click the image, read its infotext.
    page.get_by_role("tab", name="History").click()
    page.fill("#history_query textarea, #history_query input", "red circle")
    page.click("#history_search")
    page.wait_for_selector("#history_gallery img")
    page.locator("#history_gallery img").first.click()
    _textarea_contains(page, "history_infotext", "Seed: 7,")
    assert page.locator("#history_infotext textarea").input_value() == infotext
    _save_screenshot(page, tmp_path, "ui-history.png")

    # PNG Info: drop the generated file (a real drop event carrying the file).
    page.get_by_role("tab", name="PNG Info").click()
    page.wait_for_selector("#pnginfo_file")
    page.evaluate(
        """async (b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            const zone = document.querySelector('#pnginfo_file button');  // Gradio's drop zone
            for (const type of ['dragenter', 'dragover', 'drop'])
                zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
        }""", base64.b64encode(png.content).decode())
    _textarea_contains(page, "pnginfo_text", "Seed: 7,")
    assert page.locator("#pnginfo_text textarea").input_value() == infotext

    # Send to img2img, and run it there.
    page.get_by_role("tab", name="txt2img").click()
    page.click("#txt2img_send_to_img2img")
    page.wait_for_selector("#img2img_init img")
    assert page.locator("#img2img_prompt textarea").input_value() == prompt
    for name, value in (("steps", 4), ("width", 64), ("height", 64), ("seed", 3)):
        _set_number(page, f"img2img_{name}", value)
    page.click("#img2img_generate")
    _textarea_contains(page, "img2img_infotext", "Denoising strength: 0.75")
    assert "Seed: 3," in page.locator("#img2img_infotext textarea").input_value()
    _save_screenshot(page, tmp_path, "ui-img2img.png")
