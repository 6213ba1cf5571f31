"""The web UI: Gradio Blocks mounted in the server's FastAPI app, laid out as A1111's.

A thin shell like the others: every button builds GenerationRequest fields, goes through
``ServerState.prepare_request`` and the job queue, and shows what the worker reports (progress,
preview PNG bytes, saved files). Tabs: txt2img, img2img (upload, sketch, inpaint with a brush
mask), Extras, control projects, Video, 3D, Talk, Comic, Checkpoint merger, Train, Queue, History, PNG Info, Settings
(``ui_generate.py``, ``ui_tools.py``). Every label is translated in the browser from one table
(``ui_i18n.py``). Files reach the UI only as uploads or as danqing's outputs (``ui_files.py``).
"""

# No ``from __future__ import annotations`` here: Gradio reads the handlers' annotations
# (``gr.SelectData``) at run time to pass them the event.
from danqing.apps import QueuedStudio
from danqing.apps.control_projects import colorize, creative_text, qr_art, restyle
from danqing.errors import DanqingError, InvalidRequest
from danqing.server.gradio_import import gradio
from danqing.server.ui_cards import cards_panel
from danqing.server.ui_comic import comic_tab
from danqing.server.ui_portrait import portrait_tab
from danqing.server.ui_common import add_network
from danqing.server.ui_files import UIFileGuard, path_rules
from danqing.models.native import native_side
from danqing.server.ui_generate import img2img_tab, txt2img_tab
from danqing.server.ui_i18n import i18n, keys_in, t
from danqing.server.ui_language import LanguageScript, language_picker
from danqing.server.ui_media import talk_tab, threed_tab, video_tab
from danqing.server.ui_outpaint import outpaint_panel
from danqing.server.ui_tools import extras_tab, history_tab, merger_tab, png_info_tab, queue_tab, settings_tab
from danqing.server.ui_train import train_tab

__all__ = ["add_network", "build_ui", "font_name", "mount_ui"]  # add_network: the cards' rule

# Pictures whole and sharp: small outputs are scaled up without smoothing, never cropped.
CSS = """
.dq-gallery img { image-rendering: pixelated; object-fit: contain !important; }
"""


def mount_ui(app, state):
    """The web UI mounted at ``/`` of the server's FastAPI ``app``: Gradio serves danqing's
    outputs and its own upload cache only, and every file a client names must be one of those
    (``server/ui_files.py``)."""
    gr = gradio()

    demo = build_ui(state)
    app = gr.mount_gradio_app(app, demo, path="/", max_file_size=state.server.max_upload_bytes,
                              ssr_mode=False, footer_links=["settings"], i18n=i18n(keys_in(demo.config)),
                              css=CSS, **path_rules(state.settings))
    app.add_middleware(UIFileGuard, outputs_dir=state.settings.outputs_dir)
    app.add_middleware(LanguageScript)  # the language picked in Settings (ui_language.py)
    return app


def build_ui(state):
    """The Blocks of the web UI for one ServerState: a model row, then one tab per task."""
    gr = gradio()

    opts = state.options()
    side = native_side(state.registry, opts["sd_model_checkpoint"])
    with gr.Blocks(title="丹青 danqing", analytics_enabled=False) as demo:
        top = _model_row(gr, state, opts)
        with gr.Tabs() as tabs:
            with gr.Tab(t("txt2img"), id="txt2img"):
                c = txt2img_tab(gr, state, top, opts, side)
            with gr.Tab(t("img2img"), id="img2img"):
                i = img2img_tab(gr, state, top, side)
                outpaint_panel(gr, i)  # ui_outpaint.py
            with gr.Tab(t("Extras"), id="extras"):
                x = extras_tab(gr, state)
            with gr.Tab(t("Control projects"), id="control_apps"):  # danqing/apps/control_projects.py
                _apps_tab(gr, state)
            with gr.Tab(t("Video"), id="video"):  # server/ui_media.py
                video_tab(gr, state)
            with gr.Tab(t("3D"), id="3d"):
                threed_tab(gr, state)
            with gr.Tab(t("Talk"), id="talk"):
                talk_tab(gr, state)
            with gr.Tab(t("Apps"), id="apps"):  # the course's products, one sub-tab each
                with gr.Tabs():
                    with gr.Tab(t("Comic"), id="comic"):  # server/ui_comic.py
                        comic_tab(gr, state)
                    with gr.Tab(t("Portrait studio"), id="portrait"):  # server/ui_portrait.py
                        portrait_tab(gr, state)
            with gr.Tab(t("Checkpoint merger"), id="merger"):
                merger_tab(gr, state)
            with gr.Tab(t("Train"), id="train"):
                train_tab(gr, state)
            with gr.Tab(t("Queue"), id="queue"):
                queue_tab(gr, state, demo)
            with gr.Tab(t("History"), id="history"):
                history_tab(gr, state, demo)
            with gr.Tab(t("PNG Info"), id="pnginfo"):
                png_info_tab(gr, state)
            with gr.Tab(t("Settings"), id="settings"):
                settings_tab(gr, state, top, opts)
                language_picker(gr, demo)
        _send_to(gr, tabs, c, i, x)
        cards_panel(gr, state, c["prompt"])  # extra-network cards (ui_cards.py)

        def model_size(name):
            s = native_side(state.registry, name)
            return s, s, s, s

        top["model"].change(model_size, inputs=[top["model"]],
                            outputs=[c["width"], c["height"], i["width"], i["height"]], queue=False)
    return demo


def _send_to(gr, tabs, c: dict, i: dict, x: dict) -> None:
    """A1111's "Send to" buttons of both output columns: the selected picture (and the prompts)
    to img2img, inpaint, Extras or txt2img's ControlNet unit."""
    for src in (c, i):
        def picked(path):
            if not path:
                raise gr.Error("select a picture in the gallery first")
            return path

        def to_img2img(path, prompt, negative):
            return picked(path), prompt, negative, gr.Tabs(selected="img2img"), \
                gr.Tabs(selected="img2img_mode_upload"), "upload"

        def to_inpaint(path, prompt, negative):
            return {"background": picked(path), "layers": [], "composite": path}, prompt, negative, \
                gr.Tabs(selected="img2img"), gr.Tabs(selected="img2img_mode_inpaint"), "inpaint"

        targets = [i["prompt"], i["negative_prompt"], tabs, i["modes"], i["mode"]]
        src["to_img2img"].click(to_img2img, inputs=[src["selected"], src["prompt"], src["negative_prompt"]],
                                outputs=[i["init"], *targets])
        src["to_inpaint"].click(to_inpaint, inputs=[src["selected"], src["prompt"], src["negative_prompt"]],
                                outputs=[i["editor"], *targets])
        src["to_extras"].click(lambda p: (picked(p), gr.Tabs(selected="extras")), inputs=[src["selected"]],
                               outputs=[x["image"], tabs])
        src["to_controlnet"].click(lambda p: (picked(p), gr.Tabs(selected="txt2img")), inputs=[src["selected"]],
                                   outputs=[c["controlnet_image"], tabs])


def _model_row(gr, state, opts) -> dict:
    """Checkpoint, VAE, LoRA and embedding pickers (names from the models folder) and Refresh."""
    reg = state.registry

    def names(kind: str) -> list[str]:
        return [e.name for e in reg.scan(kind)]

    with gr.Row():
        row = {
            "model": gr.Dropdown(names("checkpoint"), value=opts["sd_model_checkpoint"], label=t("Checkpoint"),
                                 elem_id="model"),
            "vae": gr.Dropdown(["Automatic"] + names("vae"), value=opts["sd_vae"], label=t("VAE"), elem_id="vae"),
            "lora": gr.Dropdown(names("lora"), value=None, label=t("LoRA (adds <lora:name:1> to the txt2img prompt)"),
                                interactive=True, elem_id="lora"),
            "embedding": gr.Dropdown(names("embedding"), value=None, interactive=True, elem_id="embedding",
                                     label=t("Embedding (adds its name to the txt2img prompt)")),
        }
        refresh = gr.Button(t("Refresh models"), scale=0)

    def do_refresh():
        return (gr.update(choices=names("checkpoint")), gr.update(choices=["Automatic"] + names("vae")),
                gr.update(choices=names("lora")), gr.update(choices=names("embedding")))

    refresh.click(do_refresh, outputs=[row["model"], row["vae"], row["lora"], row["embedding"]])
    return row


def _apps_tab(gr, state) -> None:
    """The control projects (colourisation, QR art, creative text, restyling) through the queue."""
    def through_queue(fn):
        """Run an app through the job queue; our errors become a Gradio error line."""
        def wrapped(*args):
            try:
                return fn(QueuedStudio(state), *args)
            except DanqingError as exc:
                raise gr.Error(str(exc)) from None
        return wrapped

    def do_colorize(st, drawing, hints, prompt):
        if drawing is None:
            raise DanqingError("drawing: drop a line drawing first")
        return colorize(st, drawing, prompt, hints=hints).image

    def do_qr(st, text, prompt, error):
        r = qr_art(st, text, prompt, error=error)
        note = f"decoded by OpenCV: {r.decoded!r}" if r.ok else "no attempt scanned; showing the last one"
        return r.image, r.code, f"{note} ({len(r.attempts)} attempt(s))"

    def do_text(st, word, prompt, font):
        return creative_text(st, word, prompt, font=font_name(font)).image

    def do_restyle(st, photo, prompt):
        if photo is None:
            raise DanqingError("photo: drop a photo first")
        r = restyle(st, photo, prompt)
        return r.controlled, r.plain, f"edge F1 with the photo: ControlNet {r.f1_controlled:.3f}, img2img {r.f1_plain:.3f}"

    with gr.Tab(t("Line-art colourisation")):
        with gr.Row():
            col_draw = gr.Image(type="pil", label=t("Line drawing"), image_mode="RGB", elem_id="colorize_drawing")
            col_hints = gr.Image(type="pil", label=t("Colour hints (optional)"), image_mode="RGB")
        col_prompt = gr.Textbox(label=t("Prompt (with colours)"), elem_id="colorize_prompt")
        col_go = gr.Button(t("Colourise"), variant="primary", elem_id="colorize_go")
        col_out = gr.Image(label=t("Result"), elem_id="colorize_result")
    with gr.Tab(t("QR-code art")):
        qr_text = gr.Textbox(label=t("Text / URL"), elem_id="qr_text")
        qr_prompt = gr.Textbox(label=t("Prompt"), elem_id="qr_prompt")
        qr_error = gr.Radio(["L", "M", "Q", "H"], value="H", label=t("Error correction"))
        qr_go = gr.Button(t("Make QR art"), variant="primary", elem_id="qr_go")
        with gr.Row():
            qr_out = gr.Image(label=t("Picture"), elem_id="qr_result")
            qr_code = gr.Image(label=t("Code"))
        qr_status = gr.Markdown("", elem_id="qr_status")
    with gr.Tab(t("Creative text")):
        tx_word = gr.Textbox(label=t("Word"), elem_id="text_word")
        tx_prompt = gr.Textbox(label=t("Prompt"), elem_id="text_prompt")
        tx_font = gr.Textbox(label=t("Font (the file name of an installed font, e.g. DejaVuSans-Bold.ttf; empty = "
                                     "DejaVu Sans Bold, or an installed CJK font when the word needs one)"))
        tx_go = gr.Button(t("Make"), variant="primary", elem_id="text_go")
        tx_out = gr.Image(label=t("Result"), elem_id="text_result")
    with gr.Tab(t("Photo restyling")):
        rs_photo = gr.Image(type="pil", label=t("Photo"), image_mode="RGB", elem_id="restyle_photo")
        rs_prompt = gr.Textbox(label=t("Style prompt"), elem_id="restyle_prompt")
        rs_go = gr.Button(t("Restyle"), variant="primary", elem_id="restyle_go")
        with gr.Row():
            rs_out = gr.Image(label=t("With ControlNet"), elem_id="restyle_result")
            rs_plain = gr.Image(label=t("Plain img2img"))
        rs_status = gr.Markdown("")
    col_go.click(through_queue(do_colorize), inputs=[col_draw, col_hints, col_prompt], outputs=[col_out])
    qr_go.click(through_queue(do_qr), inputs=[qr_text, qr_prompt, qr_error], outputs=[qr_out, qr_code, qr_status])
    tx_go.click(through_queue(do_text), inputs=[tx_word, tx_prompt, tx_font], outputs=[tx_out])
    rs_go.click(through_queue(do_restyle), inputs=[rs_photo, rs_prompt], outputs=[rs_out, rs_plain, rs_status])


def font_name(value: str | None) -> str | None:
    """The web UI's font field: the file name of an installed font (looked up under the system
    font folders by ``find_font``), never a path on the server."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if "/" in value or "\\" in value or value.startswith((".", "~")) or "\0" in value or any(c in value for c in "*?["):
        raise InvalidRequest("font", "give the file name of an installed font (e.g. DejaVuSans-Bold.ttf), not a path")
    return value
