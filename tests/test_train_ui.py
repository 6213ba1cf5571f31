"""The Train tab in headless Chromium: a prepared dataset picked, a short LoRA run on danqing-tiny
started, the loss curve gets its points while the status reaches done. And every top-level tab
(read from the page, not from a list here) opens on a panel with its controls; with
$DANQING_UI_SCREENSHOT_DIR set each is saved as ui-tab-ID.png for docs/ui.md (scaled and reduced
to at most 200 KB)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image
from server_helpers import LiveServer, make_app
from test_server_ui_a1111 import ARGS, CHROMIUM, T, set_number, sync_api  # its need(...) checks run first

MAX_SHOT = 200 * 1024


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    home = tmp_path_factory.mktemp("ui-train-home")
    data = home / "datasets" / "dots"
    data.mkdir(parents=True)
    for i, colour in enumerate(((220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 200, 20))):
        img = Image.new("RGB", (64, 64), (245, 245, 245))
        img.paste(colour, (12 + 4 * i, 12, 44 + 4 * i, 44))
        img.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a square, colour {i}")
    with LiveServer(make_app(home, ui=True)) as server:
        yield server


@pytest.fixture(scope="module")
def page(live):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 1000}).new_page()
        pg.set_default_timeout(T)
        pg.goto(live.url + "/")
        pg.wait_for_selector("#txt2img_prompt textarea")
        yield pg
        browser.close()


def tab_shot(page, name: str) -> Path | None:
    """The page as shown, into $DANQING_UI_SCREENSHOT_DIR/name (when set): the viewport cropped to
    the page's content, then halved and reduced to 256 colours until the PNG is at most 200 KB."""
    folder = os.environ.get("DANQING_UI_SCREENSHOT_DIR")
    if not folder:
        return None
    height = min(page.evaluate("() => document.querySelector('.gradio-container').scrollHeight"), 1000)
    img = Image.open(io.BytesIO(page.screenshot(clip={"x": 0, "y": 0, "width": 1280, "height": height})))
    img = img.convert("RGB")
    scale = 1.0
    while True:
        small = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS) if scale < 1 else img
        buf = io.BytesIO()
        small.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
        if buf.tell() <= MAX_SHOT or scale < 0.3:
            break
        scale *= 0.8
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


# The loss plot's points as Vega drew them (SVG): the coordinate pairs of its line mark's path.
PLOT_POINTS = """() => { const p = document.querySelector('#train_loss g.mark-line path');
  return p ? (p.getAttribute('d').match(/-?[\\d.]+(e-?\\d+)?,-?[\\d.]+(e-?\\d+)?/g) || []).length : 0; }"""


def test_the_train_tab_runs_a_lora_with_a_live_loss_curve(page, live):
    import httpx

    page.get_by_role("tab", name="Train", exact=True).click()
    page.wait_for_selector("#train_start")
    assert page.evaluate(PLOT_POINTS) == 0
    box = page.locator("#train_dataset input")
    box.click()
    box.fill("dots")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#train_dataset input').value === 'dots'")
    page.locator("#train_name textarea").fill("dots-lora")
    for name, value in (("steps", 6), ("every", 1000), ("sample_steps", 2), ("batch", 1), ("resolution", 64)):
        set_number(page, f"train_{name}", value)
    page.click("#train_start")
    page.wait_for_function("() => /step [0-6]\\/6/.test(document.querySelector('#train_status').innerText)"
                           " || document.querySelector('.toast-body')")
    assert not page.locator(".toast-body").count(), page.locator(".toast-body").first.inner_text()
    page.wait_for_function(f"() => ({PLOT_POINTS})() >= 2")  # the curve gets its points as the steps come
    page.wait_for_function("() => /^(done|failed)/.test(document.querySelector('#train_status').innerText)",
                           timeout=3 * T)  # a busy machine trains slowly
    status = page.locator("#train_status").inner_text()
    assert status.startswith("done") and "step 6/6" in status and "<lora:dots-lora:1>" in status, status
    page.wait_for_function(f"() => ({PLOT_POINTS})() === 6")  # one point per step
    page.wait_for_selector("#train_samples img")  # the sample grid of the last step
    job = httpx.get(live.url + "/api/v1/train/jobs").json()[0]
    assert (job["kind"], job["name"], [p["step"] for p in job["losses"]]) == ("lora", "dots-lora", [1, 2, 3, 4, 5, 6])
    tab_shot(page, "ui-tab-train.png")


def test_every_top_level_tab_opens_on_its_panel(page, live):
    names = page.evaluate("""() => [...document.querySelector('[role=tablist]').querySelectorAll('[role=tab]')]
                             .map(b => b.innerText.trim())""")
    assert {"txt2img", "img2img", "Train", "Settings"} <= set(names), names
    for name in names:
        page.get_by_role("tab", name=name, exact=True).first.click()
        page.wait_for_function("(n) => [...document.querySelectorAll('[role=tab][aria-selected=true]')]"
                               ".some(b => b.innerText.trim() === n)", arg=name)
        panel = page.locator("[role=tabpanel]:visible").first
        assert panel.is_visible(), name
        assert panel.locator("button:visible, input:visible, textarea:visible").count() > 0, name
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        if slug != "train":  # the train test saved its tab with a finished run
            tab_shot(page, f"ui-tab-{slug}.png")
