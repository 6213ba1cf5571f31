"""The web UI's languages: one translation table (``data/ui_i18n.json``), English and 简体中文.

Every label, button, tab and note of the UI is written in English and wrapped in ``t(...)``;
the English text is the key, and the table maps each key to its Chinese. Gradio translates in
the browser (``gr.I18n``): the page follows the browser's language, or the language picked in
Gradio's settings panel (the "Settings" link under the page). CLI messages stay English.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

TABLE = "data/ui_i18n.json"
@functools.lru_cache(maxsize=1)
def table() -> dict[str, dict[str, str]]:
    """{locale: {English text: translation}} from ``data/ui_i18n.json``."""
    text = resources.files("danqing").joinpath(TABLE).read_text(encoding="utf-8")
    return json.loads(text)


def t(text: str):
    """A label to translate in the browser (Gradio's ``I18nData``; the key is the English text)."""
    from gradio.i18n import I18nData  # gradio: imported with the UI only

    return I18nData(text)


def i18n(keys: set[str]):
    """``gr.I18n`` for the given keys: English as written, Chinese from the table (under
    ``zh-CN`` and ``zh``, so zh-TW/zh-HK browsers read it too); a key missing from the table
    shows in English."""
    from gradio.i18n import I18n

    zh = table()["zh-CN"]
    english = {k: k for k in keys}
    chinese = {k: zh.get(k, k) for k in keys}
    return I18n(en=english, **{"zh-CN": chinese, "zh": chinese})


def keys_in(config) -> set[str]:
    """Every translation key in a Blocks config (the ``__i18n__`` values Gradio sends)."""
    found: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            if v.get("__type__") == "translation_metadata" and isinstance(v.get("key"), str):
                found.add(v["key"])
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v.startswith("__i18n__"):
            walk(json.loads(v[len("__i18n__"):]))
        elif hasattr(v, "to_dict") and getattr(v, "_type", None) == "translation_metadata":
            walk(v.to_dict())

    walk(config)
    return found
