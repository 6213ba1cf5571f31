"""The web UI: Gradio Blocks mounted in the server's FastAPI app.

A thin shell like the others: every button builds GenerationRequest fields, goes through
``ServerState.prepare_request`` and the job queue, and shows what the worker reports (progress,
preview PNG bytes, saved files). Tabs: txt2img, img2img, control projects, history, PNG info,
settings; one function builds each. Files reach it only as uploads or as danqing's outputs
(``server/ui_files.py``).
"""

# No ``from __future__ import annotations`` here: Gradio reads the handlers' annotations
# (``gr.SelectData``) at run time to pass them the event.
import io
import re
from typing import Any

from PIL import Image

from danqing.apps import QueuedStudio
from danqing.apps.control_projects import colorize, creative_text, qr_art, restyle
from danqing.conditioning.control import CONTROL_MODES
from danqing.editing.hires import hires_upscalers
from danqing.errors import DanqingError, InvalidRequest
from danqing.outputs.store import read_infotext
from danqing.preprocess import preprocessor_names
from danqing.sampling.samplers import samplers, schedule_names
from danqing.server.common import infotext_of_image
from danqing.server.gradio_import import gradio
from danqing.server.store import TERMINAL
from danqing.server.security import open_image
from danqing.server.ui_files import REFUSED, UIFileGuard, allowed_file, path_rules, upload_folder

# (request field, label) of the txt2img controls, in the order the handler receives them.
TXT2IMG_FIELDS = [
    "prompt", "negative_prompt", "sampler", "schedule", "steps", "cfg_scale", "width", "height", "seed",
    "subseed", "subseed_strength", "batch_size", "batch_count", "clip_skip", "rng",
    "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_resize_x",
    "hr_resize_y", "hr_sampler_name", "hr_prompt", "hr_negative_prompt",
]
IMG2IMG_FIELDS = [
    "prompt", "negative_prompt", "sampler", "schedule", "steps", "cfg_scale", "width", "height", "seed",
    "batch_size", "batch_count", "denoising_strength", "resize_mode", "mask_blur", "inpainting_fill",
    "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
]


def add_network(prompt: str, kind: str, name: str) -> str:
    """The prompt with a picked extra network appended, as A1111's cards do: a LoRA as
    ``<lora:name:1>``, an embedding as its name; unchanged when the prompt already uses it."""
    if kind == "lora":
        if f"<lora:{name}:" in prompt:
            return prompt
        return f"{prompt} <lora:{name}:1>".strip()
    if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", prompt):
        return prompt
    return f"{prompt}, {name}" if prompt.strip() else name


def _pil(png: bytes):
    return Image.open(io.BytesIO(png))


def _status_line(state, job) -> str:
    if job.status == "queued":
        return f"queued ({state.store.position(job)} ahead)"
    p = state.worker.progress(job.id)
    if job.status == "running" and p["job_id"] == job.id:
        return (f"step {p['step']}/{p['total']}, batch {p['batch_index'] + 1}/{p['batch_count']} "
                f"({p['fraction'] * 100:.0f}%, ETA {p['eta']:.1f}s)")
    return job.status


def run_job(state, fields: dict[str, Any], *, init_image=None, mask=None):
    """Submit through the queue and yield (gallery, infotext, status) until the job ends."""
    gr = gradio()

    try:
        job = state.submit(fields, source="ui", save=True, init_image=init_image, mask=mask)
    except DanqingError as exc:
        raise gr.Error(str(exc)) from None
    shown = None
    while True:
        job = state.worker.wait(job.id, timeout=0.25)
        if job.status in TERMINAL:
            break
        p = state.worker.progress(job.id)
        preview = p["preview_png"] if p["job_id"] == job.id else None
        gallery = [_pil(preview)] if preview is not None and p["preview_step"] != shown else gr.skip()
        shown = p["preview_step"] if preview is not None else shown
        yield gallery, gr.skip(), _status_line(state, job)
    if job.status != "done":
        raise gr.Error(job.error or f"job {job.status}")
    images = job.result["images"]
    gallery = [(i["path"], f"seed {i['seed']}") for i in images]
    secs = job.result["timings"].get("total", 0)
    note = " (interrupted)" if job.result.get("interrupted") else ""
    yield gallery, images[0]["infotext"] if images else "", f"done{note}: {len(images)} image(s) in {secs:.2f}s"


def mount_ui(app, state):
    """The web UI mounted at ``/`` of the server's FastAPI ``app``: Gradio serves danqing's
    outputs and its own upload cache only, and every file a client names must be one of those
    (``server/ui_files.py``)."""
    gr = gradio()

    app = gr.mount_gradio_app(app, build_ui(state), path="/", max_file_size=state.server.max_upload_bytes,
                              ssr_mode=False, footer_links=[], **path_rules(state.settings))
    app.add_middleware(UIFileGuard, outputs_dir=state.settings.outputs_dir)
    return app


def build_ui(state):
    """The Blocks of the web UI for one ServerState: a model row, then one tab per task."""
    gr = gradio()

    opts = state.options()
    with gr.Blocks(title="丹青 danqing", analytics_enabled=False) as demo:
        gr.Markdown("## 丹青 danqing studio")
        top = _model_row(gr, state, opts)
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                t = _txt2img_tab(gr, state, top, opts)
            with gr.Tab("img2img", id="img2img"):
                i = _img2img_tab(gr, state, top)
            with gr.Tab("Control projects", id="control_apps"):  # danqing/apps/control_projects.py
                _apps_tab(gr, state)
            with gr.Tab("History", id="history"):
                _history_tab(gr, state, demo)
            with gr.Tab("PNG Info", id="pnginfo"):
                _png_info_tab(gr, state)
            with gr.Tab("Settings", id="settings"):
                _settings_tab(gr, state, top, opts)

        def send_to_img2img(path, prompt, negative, infotext_value):
            if not path:
                raise gr.Error("select an image in the gallery first")
            return path, prompt, negative, gr.Tabs(selected="img2img")

        t["send"].click(send_to_img2img, inputs=[t["selected"], t["prompt"], t["negative_prompt"], t["infotext"]],
                        outputs=[i["init"], i["prompt"], i["negative_prompt"], tabs])
    return demo


def _model_row(gr, state, opts) -> dict:
    """Checkpoint, VAE, LoRA and embedding pickers (names from the models folder) and Refresh."""
    reg = state.registry

    def names(kind: str) -> list[str]:
        return [e.name for e in reg.scan(kind)]

    with gr.Row():
        row = {
            "model": gr.Dropdown(names("checkpoint"), value=opts["sd_model_checkpoint"], label="Checkpoint",
                                 elem_id="model"),
            "vae": gr.Dropdown(["Automatic"] + names("vae"), value=opts["sd_vae"], label="VAE", elem_id="vae"),
            "lora": gr.Dropdown(names("lora"), value=None, label="LoRA (adds <lora:name:1> to the txt2img prompt)",
                                interactive=True, elem_id="lora"),
            "embedding": gr.Dropdown(names("embedding"), value=None, interactive=True, elem_id="embedding",
                                     label="Embedding (adds its name to the txt2img prompt)"),
        }
        refresh = gr.Button("Refresh models", scale=0)

    def do_refresh():
        return (gr.update(choices=names("checkpoint")), gr.update(choices=["Automatic"] + names("vae")),
                gr.update(choices=names("lora")), gr.update(choices=names("embedding")))

    refresh.click(do_refresh, outputs=[row["model"], row["vae"], row["lora"], row["embedding"]])
    return row


def _txt2img_tab(gr, state, top: dict, opts) -> dict:
    """Prompt, sampling, hires fix and ControlNet controls; Generate / Interrupt; the gallery."""
    sampler_names = list(samplers())
    t = _common_controls(gr, "txt2img", sampler_names, schedule_names())

    def add_picked(kind):
        def add(name, prompt):
            """A1111's extra-network cards: picking a LoRA / embedding appends it to the prompt."""
            if not name:
                return gr.update(), gr.update()
            return add_network(prompt, kind, name), gr.update(value=None)
        return add

    top["lora"].change(add_picked("lora"), [top["lora"], t["prompt"]], [t["prompt"], top["lora"]])
    top["embedding"].change(add_picked("embedding"), [top["embedding"], t["prompt"]], [t["prompt"], top["embedding"]])
    with gr.Row():
        t["subseed"] = gr.Number(-1, label="Variation seed", precision=0, elem_id="txt2img_subseed")
        t["subseed_strength"] = gr.Slider(0, 1, 0, step=0.01, label="Variation strength")
        t["clip_skip"] = gr.Slider(1, 12, opts["CLIP_stop_at_last_layers"], step=1, label="Clip skip")
        t["rng"] = gr.Radio(["cpu", "gpu"], value="cpu", label="RNG")
    _hires_controls(gr, state, t, sampler_names)
    cn = _controlnet_controls(gr, state)
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
        stop = gr.Button("Interrupt", elem_id="txt2img_interrupt")
    status = gr.Markdown("", elem_id="txt2img_status")
    gallery = gr.Gallery(label="Output", columns=4, rows=1, height="auto", object_fit="contain", preview=False,
                         elem_id="txt2img_gallery")
    t["infotext"] = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                               elem_id="txt2img_infotext", buttons=["copy"])
    t["send"] = gr.Button("Send to img2img", elem_id="txt2img_send_to_img2img")
    t["selected"] = gr.State(None)

    def txt2img(*values):
        values, (c_image, c_model, c_module, c_weight, c_mode) = values[:-5], values[-5:]
        fields = dict(zip(TXT2IMG_FIELDS, values[:-2]))
        fields["model"], fields["vae"] = values[-2], values[-1]
        fields = _clean(fields)
        if c_image is not None:
            if not c_model:
                raise gr.Error("controlnet: choose a ControlNet model for the control image")
            fields["controlnet"] = [{"model": c_model, "image": c_image,  # stored once the request is accepted
                                     "module": c_module or "none", "weight": float(c_weight), "control_mode": c_mode}]
        yield from run_job(state, fields)

    go.click(txt2img, inputs=[t[k] for k in TXT2IMG_FIELDS] + [top["model"], top["vae"], *cn],
             outputs=[gallery, t["infotext"], status], concurrency_limit=None)
    stop.click(lambda: state.worker.interrupt() and None, queue=False)

    def on_select(evt: gr.SelectData, value):
        item = value[evt.index] if value and isinstance(evt.index, int) and evt.index < len(value) else None
        path = _item_path(item)
        text = ""
        if path:
            try:
                text = read_infotext(path)
            except DanqingError:
                pass
        return path, text

    gallery.select(on_select, inputs=[gallery], outputs=[t["selected"], t["infotext"]])
    # After a run the first image is the selected one (so "send" works without a click).
    gallery.change(lambda v: _item_path(v[0]) if v else None, inputs=[gallery], outputs=[t["selected"]])
    return t


def _hires_controls(gr, state, t: dict, sampler_names: list[str]) -> None:
    with gr.Accordion("Hires fix", open=False):
        with gr.Row():
            t["enable_hr"] = gr.Checkbox(False, label="Enable hires fix")
            t["hr_scale"] = gr.Slider(1, 4, 2, step=0.05, label="Upscale by")
            t["hr_upscaler"] = gr.Dropdown(hires_upscalers(state.worker.studio.upscalers), value="Latent", label="Upscaler")
            t["hr_second_pass_steps"] = gr.Slider(0, 150, 0, step=1, label="Hires steps (0 = same)")
            t["denoising_strength"] = gr.Slider(0, 1, 0.7, step=0.01, label="Denoising strength")
        with gr.Row():
            t["hr_resize_x"] = gr.Slider(0, 4096, 0, step=8, label="Resize width to")
            t["hr_resize_y"] = gr.Slider(0, 4096, 0, step=8, label="Resize height to")
            t["hr_sampler_name"] = gr.Dropdown(["Use same sampler"] + sampler_names, value="Use same sampler",
                                               label="Hires sampler")
        t["hr_prompt"] = gr.Textbox(label="Hires prompt (empty = same)", lines=1)
        t["hr_negative_prompt"] = gr.Textbox(label="Hires negative prompt (empty = same)", lines=1)


def _controlnet_controls(gr, state) -> list:
    """(image, model, module, weight, mode) of txt2img's one ControlNet unit."""
    with gr.Accordion("ControlNet", open=False):
        with gr.Row():
            image = gr.Image(type="pil", label="Control image (a map, or a picture + preprocessor)",
                             sources=["upload", "clipboard"], elem_id="txt2img_controlnet_image", image_mode="RGB")
            with gr.Column():
                model = gr.Dropdown([e.name for e in state.registry.scan("controlnet")], value=None,
                                    label="ControlNet model", elem_id="txt2img_controlnet_model")
                module = gr.Dropdown(preprocessor_names(), value="none", label="Preprocessor",
                                     elem_id="txt2img_controlnet_module")
                weight = gr.Slider(0, 2, 1, step=0.05, label="Control weight")
                mode = gr.Dropdown(list(CONTROL_MODES), value="Balanced", label="Control mode")
    return [image, model, module, weight, mode]


def _img2img_tab(gr, state, top: dict) -> dict:
    """Init picture and mask, the editing controls, Generate / Interrupt, the gallery."""
    with gr.Row():
        init = gr.Image(type="pil", label="Init image", sources=["upload", "clipboard"], elem_id="img2img_init",
                        image_mode="RGB")
        mask_in = gr.Image(type="pil", label="Inpaint mask (optional, white = repaint)",
                           sources=["upload", "clipboard"], elem_id="img2img_mask", image_mode="L")
    i = _common_controls(gr, "img2img", list(samplers()), schedule_names())
    i["init"] = init
    with gr.Row():
        i["denoising_strength"] = gr.Slider(0, 1, 0.75, step=0.01, label="Denoising strength")
        i["resize_mode"] = gr.Dropdown(["just resize", "crop and resize", "resize and fill", "latent upscale"],
                                       value="just resize", label="Resize mode")
    with gr.Accordion("Inpaint", open=False):
        with gr.Row():
            i["mask_blur"] = gr.Slider(0, 64, 4, step=1, label="Mask blur")
            i["inpainting_fill"] = gr.Dropdown(["fill", "original", "latent noise", "latent nothing"],
                                               value="original", label="Masked content")
            i["inpaint_full_res"] = gr.Checkbox(False, label="Only masked")
            i["inpaint_full_res_padding"] = gr.Slider(0, 256, 32, step=4, label="Only masked padding")
            i["inpainting_mask_invert"] = gr.Checkbox(False, label="Inpaint not masked")
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="img2img_generate")
        stop = gr.Button("Interrupt")
    status = gr.Markdown("", elem_id="img2img_status")
    gallery = gr.Gallery(label="Output", columns=4, rows=1, height="auto", object_fit="contain", preview=False,
                         elem_id="img2img_gallery")
    infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id="img2img_infotext")

    def img2img(init_img, mask_img, *values):
        if init_img is None:
            raise gr.Error("init_image: drop a picture into Init image first")
        fields = dict(zip(IMG2IMG_FIELDS, values[:-2]))
        fields["model"], fields["vae"] = values[-2], values[-1]
        yield from run_job(state, _clean(fields), init_image=init_img, mask=mask_img)

    go.click(img2img, inputs=[init, mask_in] + [i[k] for k in IMG2IMG_FIELDS] + [top["model"], top["vae"]],
             outputs=[gallery, infotext, status], concurrency_limit=None)
    stop.click(lambda: state.worker.interrupt() and None, queue=False)
    return i


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

    with gr.Tab("Line-art colourisation"):
        with gr.Row():
            col_draw = gr.Image(type="pil", label="Line drawing", image_mode="RGB", elem_id="colorize_drawing")
            col_hints = gr.Image(type="pil", label="Colour hints (optional)", image_mode="RGB")
        col_prompt = gr.Textbox(label="Prompt (with colours)", elem_id="colorize_prompt")
        col_go = gr.Button("Colourise", variant="primary", elem_id="colorize_go")
        col_out = gr.Image(label="Result", elem_id="colorize_result")
    with gr.Tab("QR-code art"):
        qr_text = gr.Textbox(label="Text / URL", elem_id="qr_text")
        qr_prompt = gr.Textbox(label="Prompt", elem_id="qr_prompt")
        qr_error = gr.Radio(["L", "M", "Q", "H"], value="H", label="Error correction")
        qr_go = gr.Button("Make QR art", variant="primary", elem_id="qr_go")
        with gr.Row():
            qr_out = gr.Image(label="Picture", elem_id="qr_result")
            qr_code = gr.Image(label="Code")
        qr_status = gr.Markdown("", elem_id="qr_status")
    with gr.Tab("Creative text"):
        tx_word = gr.Textbox(label="Word", elem_id="text_word")
        tx_prompt = gr.Textbox(label="Prompt", elem_id="text_prompt")
        tx_font = gr.Textbox(label="Font (the file name of an installed font, e.g. DejaVuSans-Bold.ttf; empty = "
                                   "DejaVu Sans Bold, or an installed CJK font when the word needs one)")
        tx_go = gr.Button("Make", variant="primary", elem_id="text_go")
        tx_out = gr.Image(label="Result", elem_id="text_result")
    with gr.Tab("Photo restyling"):
        rs_photo = gr.Image(type="pil", label="Photo", image_mode="RGB", elem_id="restyle_photo")
        rs_prompt = gr.Textbox(label="Style prompt", elem_id="restyle_prompt")
        rs_go = gr.Button("Restyle", variant="primary", elem_id="restyle_go")
        with gr.Row():
            rs_out = gr.Image(label="With ControlNet", elem_id="restyle_result")
            rs_plain = gr.Image(label="Plain img2img")
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


def _history_tab(gr, state, demo) -> None:
    """Search the finished jobs by prompt; a click shows the picture's infotext."""
    with gr.Row():
        query = gr.Textbox(label="Search prompts", elem_id="history_query", scale=4)
        search = gr.Button("Search", elem_id="history_search", scale=0)
    gallery = gr.Gallery(label="History", columns=6, height="auto", elem_id="history_gallery")
    info = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id="history_infotext")
    texts = gr.State([])

    def do_search(q):
        items, found = [], []
        for job in state.store.history(query=q or "", status="done", limit=200):
            for img in job.result["images"]:
                if img.get("path"):
                    items.append((img["path"], job.prompt[:80]))
                    found.append(img["infotext"])
        return items, found, ""

    search.click(do_search, inputs=[query], outputs=[gallery, texts, info])
    query.submit(do_search, inputs=[query], outputs=[gallery, texts, info])
    demo.load(do_search, inputs=[query], outputs=[gallery, texts, info])

    def hist_select(evt: gr.SelectData, values):
        return values[evt.index] if isinstance(evt.index, int) and evt.index < len(values) else ""

    gallery.select(hist_select, inputs=[texts], outputs=[info])


def _png_info_tab(gr, state) -> None:
    """Drop a picture, read its generation parameters (the file is read from Gradio's upload cache)."""
    png = gr.File(label="Drop a PNG/JPEG/WebP here", file_types=["image"], elem_id="pnginfo_file")
    text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_text")

    def png_info(file):
        if file is None:
            return ""
        path = file if isinstance(file, str) else file.name
        try:  # UIFileGuard let only uploads through; checked again before the file is opened
            if not allowed_file(str(path), [upload_folder()]):
                raise InvalidRequest("image", REFUSED)
            with open(path, "rb") as f:
                raw = f.read(state.server.max_upload_bytes + 1)
            if len(raw) > state.server.max_upload_bytes:
                raise InvalidRequest("image", f"more than the limit of {state.server.max_upload_bytes} bytes")
            found = infotext_of_image(open_image(raw, "image", state.limits))
        except DanqingError as exc:
            raise gr.Error(str(exc)) from None
        return found or "(no generation parameters in this picture)"

    png.change(png_info, inputs=[png], outputs=[text])


def _settings_tab(gr, state, top: dict, opts) -> None:
    set_clip = gr.Slider(1, 12, opts["CLIP_stop_at_last_layers"], step=1, label="Default clip skip")
    save = gr.Button("Apply settings (checkpoint, VAE, clip skip)", elem_id="settings_apply")
    note = gr.Markdown(_settings_md(state))

    def apply_settings(model_name, vae_name, clip):
        try:
            state.set_options({"sd_model_checkpoint": model_name, "sd_vae": vae_name,
                               "CLIP_stop_at_last_layers": int(clip)})
        except DanqingError as exc:
            raise gr.Error(str(exc)) from None
        return _settings_md(state)

    save.click(apply_settings, inputs=[top["model"], top["vae"], set_clip], outputs=[note])


def _item_path(item) -> str | None:
    """A gallery item as Gradio hands it to a function: (path, caption), a dict or a path."""
    if item is None:
        return None
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):
        item = (item.get("image") or {}).get("path") or item.get("path")
    return str(item) if item else None


def _settings_md(state) -> str:
    o = state.options()
    return (f"Current defaults: checkpoint **{o['sd_model_checkpoint']}**, VAE **{o['sd_vae']}**, "
            f"clip skip **{o['CLIP_stop_at_last_layers']}**. Outputs: `{state.settings.outputs_dir}`; "
            f"database: `{state.store.where()}`.")


def _common_controls(gr, prefix: str, sampler_names: list[str], schedules: list[str]) -> dict:
    c: dict = {}
    c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{prefix}_prompt",
                             placeholder="A1111 syntax: (word:1.2), [from:to:when], [a|b], BREAK")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{prefix}_negative_prompt")
    with gr.Row():
        c["sampler"] = gr.Dropdown(sampler_names, value="DPM++ 2M", label="Sampling method", elem_id=f"{prefix}_sampler")
        c["schedule"] = gr.Dropdown(schedules, value="Automatic", label="Schedule type", elem_id=f"{prefix}_schedule")
        c["steps"] = gr.Slider(1, 150, 20, step=1, label="Sampling steps", elem_id=f"{prefix}_steps")
        c["cfg_scale"] = gr.Slider(1, 30, 7, step=0.5, label="CFG scale", elem_id=f"{prefix}_cfg_scale")
    with gr.Row():
        c["width"] = gr.Slider(64, 2048, 512, step=8, label="Width", elem_id=f"{prefix}_width")
        c["height"] = gr.Slider(64, 2048, 512, step=8, label="Height", elem_id=f"{prefix}_height")
        c["batch_size"] = gr.Slider(1, 8, 1, step=1, label="Batch size", elem_id=f"{prefix}_batch_size")
        c["batch_count"] = gr.Slider(1, 100, 1, step=1, label="Batch count", elem_id=f"{prefix}_batch_count")
        c["seed"] = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id=f"{prefix}_seed")
    return c


def _clean(fields: dict) -> dict:
    """UI values -> request fields: ints where the request wants ints, "same as" choices -> None."""
    out = dict(fields)
    for k in ("steps", "width", "height", "seed", "subseed", "batch_size", "batch_count", "clip_skip", "mask_blur",
              "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "inpaint_full_res_padding"):
        if k in out and out[k] is not None:
            out[k] = int(out[k])
    if out.get("hr_sampler_name") in ("Use same sampler", ""):
        out["hr_sampler_name"] = None
    for k in ("hr_prompt", "hr_negative_prompt"):
        if k in out and not out[k]:
            out[k] = None
    if out.get("vae") in ("Automatic", None):
        out.pop("vae", None)
    if not out.get("enable_hr", False):
        for k in [k for k in out if k.startswith("hr_")] + (["denoising_strength"] if "enable_hr" in out else []):
            out.pop(k)
        out.pop("enable_hr", None)
    return out
