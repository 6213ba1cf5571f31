"""The UI language picked in Settings is remembered by the browser (local storage, danqing/server/
ui_language.py): an English browser that picks 简体中文 reads Chinese, on reload and in a new tab;
"Automatic (browser)" forgets the choice. Headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import need, need_module
from server_helpers import LiveServer, make_app

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
need(CHROMIUM is not None, "chromium at /usr/bin/chromium", "Debian: apt-get install -y chromium; .ci/run installs it")
sync_api = need_module("playwright.sync_api", "pip install -e '.[test]'")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with LiveServer(make_app(tmp_path_factory.mktemp("ui-lang-home"), ui=True)) as server:
        yield server


def _generate_label(page) -> str:
    page.wait_for_selector("#txt2img_generate")
    return page.locator("#txt2img_generate").inner_text().strip()


def _pick(page, label: str) -> None:
    """Open Settings (in whichever language the page is) and pick ``label``; the page reloads."""
    page.locator("button[role=tab]", has_text=re.compile("^(Settings|设置)$")).click()
    with page.expect_navigation():
        page.locator("#settings_language label", has_text=label).click()


def test_the_picked_language_is_remembered_by_the_browser(live):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = browser.new_context(locale="en-US")
            context.set_default_timeout(60_000)
            page = context.new_page()
            page.goto(live.url + "/")
            assert _generate_label(page) == "Generate"  # the browser's language
            _pick(page, "简体中文")
            assert _generate_label(page) == "生成"
            assert page.evaluate("localStorage.getItem('danqing-ui-language')") == "zh-CN"
            other = context.new_page()  # a new tab of the same browser remembers it
            other.goto(live.url + "/")
            assert _generate_label(other) == "生成"
            other.get_by_role("tab", name="设置").click()
            assert other.locator("#settings_language input[value='zh-CN']").is_checked()
            other.get_by_role("tab", name="文生图").click()
            _pick(other, "Automatic (browser)")  # forgotten: the browser's language again
            assert _generate_label(other) == "Generate"
            assert other.evaluate("localStorage.getItem('danqing-ui-language')") is None
        finally:
            browser.close()
