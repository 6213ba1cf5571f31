"""The web UI as an A1111 user meets it, in headless Chromium: two columns with the 64x64 picture
shown whole on the right, a mask painted with the brush that inpaints only there, Extras
upscaling, the Queue tab cancelling a pending job, and the page in 中文 for a Chinese browser.
Screenshots go to $DANQING_UI_SCREENSHOT_DIR when set (docs/ui.md shows them)."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import need, need_module
from PIL import Image
from server_helpers import TINY, LiveServer, make_app

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
need(CHROMIUM is not None, "chromium at /usr/bin/chromium", "Debian: apt-get install -y chromium; .ci/run installs it")
sync_api = need_module("playwright.sync_api", "pip install -e '.[test]'")
T = 60_000  # ms
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with LiveServer(make_app(tmp_path_factory.mktemp("ui-a1111-home"), ui=True)) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, live, locale: str = "en-US"):
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(T)
    page.goto(live.url + "/")
    page.wait_for_selector("#txt2img_prompt textarea")
    return page


@pytest.fixture(scope="module")
def page(browser, live):
    pg = open_page(browser, live)
    yield pg
    pg.context.close()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box = box if box.count() else page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def shows(locator, colours, timeout_s: float) -> bool:
    """Whether every colour (RGB, within 12 per channel) comes to cover part of the element as drawn
    within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"), np.int16)
        if all((np.abs(seen - c).max(axis=2) <= 12).mean() > 0.01 for c in colours):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


def shot(page, name: str) -> None:
    folder = os.environ.get("DANQING_UI_SCREENSHOT_DIR")
    if folder:
        page.screenshot(path=str(Path(folder) / name))


def fetch_png(live, src: str) -> Image.Image:
    r = httpx.get(src if src.startswith("http") else live.url + src)
    assert r.status_code == 200, src
    return Image.open(io.BytesIO(r.content)).convert("RGB")


def wait_done(page, prefix: str) -> None:
    page.wait_for_function(f"() => document.querySelector('#{prefix}_status').innerText.startsWith('done')"
                           " || document.querySelector('.toast-body')")
    assert not page.locator(".toast-body").count(), page.locator(".toast-body").first.inner_text()
    # The saved pictures (NNNNN-SEED.png), not the last live preview, loaded.
    page.wait_for_function(f"() => {{ const i = [...document.querySelectorAll('#{prefix}_gallery img')];"
                           " return i.length && i.every(x => x.complete && x.naturalWidth > 0"
                           " && /\\/\\d{5}-\\d+\\.png$/.test(x.src)); }")


# Every box between the picture and its gallery that clips (overflow not visible) holds it whole.
GEOMETRY = """(sel) => {
  const img = document.querySelector(sel), r = img.getBoundingClientRect();
  const clipped = [];
  for (let e = img.parentElement; e && !e.classList.contains('dq-gallery'); e = e.parentElement) {
    const s = getComputedStyle(e);
    if (s.overflow === 'visible' && s.overflowY === 'visible') continue;
    const b = e.getBoundingClientRect();
    if (r.left < b.left - 0.5 || r.top < b.top - 0.5 || r.right > b.right + 0.5 || r.bottom > b.bottom + 0.5)
      clipped.push(e.className);
  }
  const g = img.closest('.dq-gallery').getBoundingClientRect();
  return {w: r.width, h: r.height, nw: img.naturalWidth, nh: img.naturalHeight, clipped,
          inside: r.left >= g.left && r.top >= g.top && r.right <= g.right && r.bottom <= g.bottom,
          fit: getComputedStyle(img).objectFit, rendering: getComputedStyle(img).imageRendering,
          left_of_prompt: document.querySelector('#txt2img_prompt').getBoundingClientRect().right <= r.left};
}"""


def test_two_columns_and_the_picture_shown_whole(page, live):
    assert page.locator("#txt2img_width input[type=number]").input_value() == "64"  # the model's native size
    page.fill("#txt2img_prompt textarea", "a red circle left of a blue square")
    for name, value in (("steps", 3), ("seed", 7)):
        set_number(page, f"txt2img_{name}", value)
    page.click("#txt2img_generate")
    wait_done(page, "txt2img")
    g = page.evaluate(GEOMETRY, "#txt2img_gallery img")
    assert (g["nw"], g["nh"]) == (64, 64)
    assert abs(g["w"] / g["h"] - 1) < 0.01 and g["w"] >= 128, g  # scaled up, aspect kept
    assert g["inside"] and not g["clipped"], g
    assert g["fit"] == "contain" and g["rendering"] == "pixelated" and g["left_of_prompt"], g
    assert "Size: 64x64" in page.locator("#txt2img_infotext textarea").input_value()
    shot(page, "ui-txt2img.png")


def test_a_mask_painted_with_the_brush_inpaints_only_there(page, live, tmp_path):
    src = np.zeros((64, 64, 3), np.uint8)
    src[:, :32] = (200, 30, 30)
    src[:, 32:] = (30, 30, 200)
    page.get_by_role("tab", name="img2img", exact=True).click()
    page.get_by_role("tab", name="Inpaint", exact=True).click()
    # Paint only once the editor shows the picture, or the stroke lands on a blank canvas. On a busy
    # machine an upload made while the tab is still mounting can be dropped: upload again then.
    page.wait_for_selector("#img2img_inpaint canvas")
    for attempt in range(3):
        Image.fromarray(src).save(tmp_path / f"init{attempt}.png")  # a new name: the input sees a change
        page.locator("#img2img_inpaint input[type=file]").set_input_files(str(tmp_path / f"init{attempt}.png"))
        if shows(page.locator("#img2img_inpaint canvas").first, [(200, 30, 30), (30, 30, 200)], 20):
            break
    else:
        raise AssertionError("the inpaint editor never showed the uploaded picture")
    page.locator("#img2img_inpaint button[aria-label=Brush]").click()
    box = page.locator("#img2img_inpaint canvas").first.bounding_box()
    # The picture is drawn centred on the canvas at the zoom the editor shows ("450%").
    zoom = float(re.search(r"(\d+)%", page.locator("#img2img_inpaint").inner_text()).group(1)) / 100

    def at(x, y):  # picture pixel -> page position
        return box["x"] + box["width"] / 2 + (x - 32) * zoom, box["y"] + box["height"] / 2 + (y - 32) * zoom

    page.mouse.move(*at(14, 32))
    page.mouse.down()
    for x in range(15, 20):  # a stroke across the left (red) half, away from its edges
        page.mouse.move(*at(x, 32), steps=2)
    page.mouse.up()
    page.locator("#img2img_inpaint_settings button").first.click()
    for name, value in (("steps", 3), ("seed", 5), ("denoising_strength", 1), ("mask_blur", 0)):
        set_number(page, f"img2img_{name}", value)
    page.click("#img2img_generate")
    wait_done(page, "img2img")
    out = np.asarray(fetch_png(live, page.locator("#img2img_gallery img").first.get_attribute("src")), np.int16)
    diff = np.abs(out - src).max(axis=2)
    changed = diff > 40
    assert changed[28:36, 14:22].mean() > 0.5, "the painted stroke was not repainted"
    assert not changed[:, 36:].any(), "pixels right of the stroke changed"
    assert not changed[:16].any() and not changed[48:].any(), "pixels above / below the stroke changed"
    shot(page, "ui-inpaint.png")


def test_extras_upscales(page, live, tmp_path):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    src.save(tmp_path / "small.png")
    page.get_by_role("tab", name="Extras", exact=True).click()
    page.locator("#extras_image input[type=file]").set_input_files(str(tmp_path / "small.png"))
    page.wait_for_selector("#extras_image img")
    set_number(page, "extras_resize", 2)
    page.locator("#extras_upscaler_1 input").fill("Nearest")
    page.keyboard.press("Enter")
    page.click("#extras_generate")
    page.wait_for_function("() => document.querySelector('#extras_info textarea').value.includes('Nearest')")
    out = fetch_png(live, page.locator("#extras_gallery img").first.get_attribute("src"))
    assert out.size == (96, 64)
    assert np.array_equal(np.asarray(out), np.asarray(src.resize((96, 64), Image.NEAREST)))
    shot(page, "ui-extras.png")


def test_the_queue_tab_cancels_a_pending_job(page, live):
    slow = {"prompt": "a slow square", "steps": 150, "batch_count": 8, **TINY}
    running = httpx.post(live.url + "/api/v1/jobs", json={"request": slow}, timeout=60).json()["id"]
    pending = httpx.post(live.url + "/api/v1/jobs", json={"request": {**slow, "prompt": "waiting"}},
                            timeout=60).json()["id"]
    try:
        page.get_by_role("tab", name="Queue", exact=True).click()
        page.click("#queue_refresh")
        page.locator(f"#queue_table >> text={pending} >> visible=true").first.click()
        page.wait_for_function("(id) => document.querySelector('#queue_job_id textarea, #queue_job_id input').value === id",
                               arg=pending)
        page.click("#queue_cancel")
        page.wait_for_function("() => document.querySelector('#queue_status').innerText.includes('cancelled')")
        assert httpx.get(f"{live.url}/api/v1/jobs/{pending}").json()["status"] == "cancelled"
        assert httpx.get(f"{live.url}/api/v1/jobs/{running}").json()["status"] in ("running", "queued")
        shot(page, "ui-queue.png")
    finally:
        for job in (pending, running):
            httpx.post(f"{live.url}/api/v1/jobs/{job}/cancel", timeout=60)


# Text that is a value or a name, not a label: numbers, sampler/model names, file names (and the
# settings' values, marked .dq-data; the galleries' captions, which are prompts).
NOT_LABELS = re.compile(r"^[\d\s.,:/+\-−↺×%()]*$|^(danqing-tiny|Automatic|DPM\+\+ 2M|cpu|gpu|none|Balanced|Latent|"
                        r"Lanczos|None|Use same sampler|just resize|original|weighted-sum|add-difference|"
                        r"English|简体中文|Automatic \(browser\))$")


def test_a_chinese_browser_reads_every_label_in_chinese(browser, live):
    page = open_page(browser, live, "zh-CN")
    try:
        untranslated = set()
        for tab in page.locator("button[role=tab]").all():
            tab.click()
            texts = page.evaluate("""() => [...document.querySelectorAll(
                'label span, [data-testid=block-info], button, [role=tab], .prose, th')]
                .filter(e => e.offsetParent !== null && !e.closest('.dq-data, .dq-gallery')).map(e => e.innerText.trim()).filter(t => t)""")
            untranslated |= {t for t in texts if not CJK.search(t) and not NOT_LABELS.match(t)}
        assert page.locator("#txt2img_generate").inner_text().strip() == "生成"
        assert not untranslated, f"labels left in English: {sorted(untranslated)}"
        page.get_by_role("tab", name="文生图").click()
        shot(page, "ui-zh.png")
    finally:
        page.context.close()


def test_every_label_of_the_ui_is_in_the_table(tmp_path, monkeypatch):
    """The translation table covers every key the UI uses (the keys are read from the built page)."""
    import danqing.server.ui as ui
    from danqing.server.ui_i18n import keys_in, table

    captured = {}
    real = ui.build_ui
    monkeypatch.setattr(ui, "build_ui", lambda state: captured.setdefault("demo", real(state)))
    make_app(tmp_path, ui=True)
    keys = keys_in(captured["demo"].config)
    zh = table()["zh-CN"]
    assert len(keys) > 100
    assert sorted(k for k in keys if k not in zh) == []
    assert all(CJK.search(zh[k]) for k in keys), [k for k in keys if not CJK.search(zh[k])]


def test_the_painted_pixels_are_the_mask():
    from danqing.server.ui_generate import editor_mask

    bg = Image.new("RGB", (8, 8), (10, 20, 30))
    layer = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    layer.putpixel((2, 3), (255, 255, 255, 255))
    layer.putpixel((5, 5), (255, 255, 255, 40))  # a soft brush edge counts as painted
    picture, mask = editor_mask({"background": bg, "layers": [layer], "composite": bg})
    assert picture.getpixel((0, 0)) == (10, 20, 30)
    m = np.asarray(mask)
    assert m[3, 2] == 255 and m[5, 5] == 255 and m.sum() == 2 * 255
    assert editor_mask({"background": bg, "layers": [], "composite": bg}) == (bg, None)


def test_every_handler_gets_the_event_or_request_it_asks_for(tmp_path, monkeypatch):
    """Gradio hands a handler its ``gr.SelectData`` / ``gr.Request`` by reading the handler's
    annotations at run time. In a module with ``from __future__ import annotations`` whose ``gr``
    is not a global, the annotation cannot be read: Gradio then fills that parameter from the
    inputs, and the click fails (a LoRA card's did)."""
    import inspect

    from gradio.utils import get_type_hints

    import danqing.server.ui as ui

    captured = {}
    real = ui.build_ui
    monkeypatch.setattr(ui, "build_ui", lambda state: captured.setdefault("demo", real(state)))
    make_app(tmp_path, ui=True)
    fns = [f.fn for f in captured["demo"].fns.values() if f.fn is not None]
    asking, bad = 0, []
    for fn in fns:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            continue
        for name, p in params.items():
            text = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            if any(w in str(text) for w in ("SelectData", "Request", "EventData")):
                asking += 1
                if name not in get_type_hints(fn):
                    bad.append(f"{fn.__module__}.{fn.__qualname__}({name})")
    assert asking >= 8 and bad == [], bad
