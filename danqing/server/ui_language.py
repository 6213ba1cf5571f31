"""The UI language picked in Settings, remembered by the browser.

The choice lives in the browser's local storage (key ``danqing-ui-language``), not in the
server's options: the language is a preference of the person at that browser, and one server
has users who read different languages (the server's options are shared by every client). With
no choice stored the page follows the browser's language, as Gradio does by itself.

How: Gradio picks the page's locale from ``navigator.language`` when its code starts; the
script ``HEAD`` (put first in the page's ``<head>`` by ``LanguageScript``, before Gradio's own
scripts: Gradio's ``head=`` option runs too late) answers with the stored choice. Picking a
language stores it and reloads the page, so that every label follows.
"""

from __future__ import annotations

from danqing.server.ui_i18n import t

STORAGE_KEY = "danqing-ui-language"
BROWSER = "browser"
# (label, value): the labels are shown as written (each in its own language)
CHOICES = [("Automatic (browser)", BROWSER), ("English", "en"), ("简体中文", "zh-CN")]
LOCALES = tuple(v for _, v in CHOICES if v != BROWSER)

HEAD = f"""<script>
(function () {{
  try {{
    var v = window.localStorage.getItem("{STORAGE_KEY}");
    if ({list(LOCALES)!r}.indexOf(v) >= 0) {{
      Object.defineProperty(Navigator.prototype, "language", {{get: function () {{ return v; }}, configurable: true}});
      Object.defineProperty(Navigator.prototype, "languages", {{get: function () {{ return [v]; }}, configurable: true}});
    }}
  }} catch (e) {{}}
}})();
</script>"""

# the stored choice, shown by the picker when the page opens
READ_JS = f"""() => {{
  const v = window.localStorage.getItem("{STORAGE_KEY}");
  return {list(LOCALES)!r}.includes(v) ? v : "{BROWSER}";
}}"""

# store the choice (forget it for "browser") and reload so that every label follows
PICK_JS = f"""(v) => {{
  if (v === "{BROWSER}") window.localStorage.removeItem("{STORAGE_KEY}");
  else window.localStorage.setItem("{STORAGE_KEY}", v);
  window.location.reload();
  return v;
}}"""


class LanguageScript:
    """ASGI middleware: ``HEAD`` first in the ``<head>`` of the UI's HTML page (``GET /``)."""

    def __init__(self, app, path: str = "/"):
        self.app, self.path = app, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":  # e.g. Starlette's test client's http.response.debug
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            if dict(start["headers"]).get(b"content-type", b"").startswith(b"text/html") and b"<head>" in body:
                body = body.replace(b"<head>", b"<head>" + HEAD.encode(), 1)
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


def language_picker(gr, demo):
    """The Settings tab's language radio (its value read from the cookie when the page opens)."""
    radio = gr.Radio(CHOICES, value=BROWSER, label=t("UI language (remembered by this browser)"),
                     elem_id="settings_language")
    radio.input(None, inputs=[radio], outputs=[radio], js=PICK_JS)  # .input: only a person's pick
    demo.load(None, outputs=[radio], js=READ_JS)
    return radio
