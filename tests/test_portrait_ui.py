"""The web UI's Portrait studio tab in headless Chromium: photos dropped in (two of the astronaut,
one without a face) -> the verdict table with the rejection's reason; Train runs the person's
LoRA as a training job and shows its progress to the end; Generate shows the ranked gallery. The
screenshot goes to $DANQING_UI_SCREENSHOT_DIR when set (docs/apps.md shows it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import need, need_module
from PIL import Image, ImageEnhance, ImageOps
from server_helpers import LiveServer, make_app

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
T = 180_000  # ms
TINY_STYLE = 'title = "Tiny"\nprompt = "a portrait of {trigger}"\nwidth = 64\nheight = 64\nsteps = 3\nsampler = "Euler"\n'


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    data = need_module("skimage.data", "pip install -e '.[test]'")
    need_module("dlib", "pip install -e '.[faces]'")
    folder = tmp_path_factory.mktemp("photos")
    astronaut = Image.fromarray(data.astronaut())
    astronaut.save(folder / "front.jpg", quality=92)
    ImageEnhance.Brightness(ImageOps.mirror(astronaut)).enhance(1.2).save(folder / "mirror.png")
    Image.new("RGB", (400, 400), (128, 140, 150)).save(folder / "wall.jpg")
    return [str(folder / n) for n in ("front.jpg", "mirror.png", "wall.jpg")]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    need(CHROMIUM is not None, "chromium at /usr/bin/chromium", "Debian: apt-get install -y chromium; .ci/run installs it")
    sync_api = need_module("playwright.sync_api", "pip install -e '.[test]'")
    home = tmp_path_factory.mktemp("portrait-ui")
    (home / "styles" / "portrait").mkdir(parents=True)
    (home / "styles" / "portrait" / "tiny.toml").write_text(TINY_STYLE, encoding="utf-8")
    from danqing import Settings, Studio

    # a Studio of its own: the person's LoRA is installed in its models folder, not in the shared one
    studio = Studio(Settings(home=home, device="cpu", dtype="fp32"))
    with LiveServer(make_app(home, studio=studio, ui=True)) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_context(viewport={"width": 1280, "height": 1400}).new_page()
        pg.set_default_timeout(T)
        pg.goto(live.url + "/")
        pg.wait_for_selector("#txt2img_prompt textarea")
        yield pg
        browser.close()


def test_the_portrait_tab_adds_trains_and_ranks(page, photos):
    page.get_by_role("tab", name="Apps", exact=True).click()
    page.get_by_role("tab", name="Portrait studio", exact=True).click()
    page.fill("#portrait_name textarea", "anna")
    page.fill("#portrait_size input", "64")
    page.fill("#portrait_min input", "2")
    page.locator("#portrait_photos input[type=file]").set_input_files(photos)
    page.wait_for_function("() => document.querySelectorAll('#portrait_photos .file-preview tr, "
                           "#portrait_photos .file').length >= 3")
    page.click("#portrait_add")
    page.wait_for_function("() => document.querySelector('#portrait_status').innerText.includes('accepted')"
                           " || document.querySelector('.toast-body')")
    assert not page.locator(".toast-body").count(), page.locator(".toast-body").first.inner_text()
    assert "2 of 3 photos accepted" in page.locator("#portrait_status").inner_text()
    table = page.locator("#portrait_verdicts").inner_text()
    assert "wall.jpg" in table and "no face found" in table and "rejected" in table

    page.locator("#portrait_recipe input").fill("cpu")
    page.locator("#portrait_recipe input").press("Enter")
    page.fill("#portrait_steps input", "2")
    page.click("#portrait_train")
    page.wait_for_function("() => /done|failed|cancelled/.test(document.querySelector('#portrait_train_status').innerText)"
                           " || document.querySelector('.toast-body')")
    assert not page.locator(".toast-body").count(), page.locator(".toast-body").first.inner_text()
    line = page.locator("#portrait_train_status").inner_text()
    assert "done" in line and "step 2/2" in line and "<lora:anna:1>" in line, line

    page.locator("#portrait_style input").fill("tiny")
    page.locator("#portrait_style input").press("Enter")
    page.fill("#portrait_n input", "2")
    page.fill("#portrait_keep input", "2")
    page.click("#portrait_generate")
    page.wait_for_function("() => document.querySelector('#portrait_status').innerText.startsWith('done')"
                           " || document.querySelector('.toast-body')")
    assert not page.locator(".toast-body").count(), page.locator(".toast-body").first.inner_text()
    page.wait_for_function("() => document.querySelectorAll('#portrait_gallery img').length >= 2")
    captions = page.locator("#portrait_gallery").inner_text()
    assert "#1" in captions and "#2" in captions, captions
    folder = os.environ.get("DANQING_UI_SCREENSHOT_DIR")
    if folder:
        page.screenshot(path=str(Path(folder) / "ui-portrait.png"), full_page=True)
