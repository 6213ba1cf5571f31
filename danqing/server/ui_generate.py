"""The web UI's generation tabs: txt2img and img2img (with sketch and inpaint), in A1111's two
columns -- settings on the left, the gallery, infotext and "Send to" buttons on the right.

The inpaint mask is drawn with Gradio's image editor: the painted pixels (any layer's alpha) are
the mask, white = repaint as in A1111. Width and height start at the selected model's native size.
"""

# No ``from __future__ import annotations``: Gradio reads the handlers' annotations at run time.
from pathlib import Path

import numpy as np
from PIL import Image

from danqing.apps.families import check_fields, family_of
from danqing.conditioning.control import CONTROL_MODES
from danqing.editing.hires import hires_upscalers
from danqing.errors import DanqingError
from danqing.outputs.store import read_infotext
from danqing.preprocess import preprocessor_names
from danqing.sampling.samplers import samplers, schedule_names
from danqing.server.state import ClipUpload
from danqing.server.ui_common import IMG2IMG_FIELDS, TXT2IMG_FIELDS, add_network, clean, item_path, run_job
from danqing.server.ui_i18n import t

MASK_COLOUR = "#ffffff"


def common_controls(gr, prefix: str, side: int) -> dict:
    """Prompt, negative prompt, sampler, steps, CFG, size, batch and seed (A1111's left column)."""
    c: dict = {}
    c["prompt"] = gr.Textbox(label=t("Prompt"), lines=3, elem_id=f"{prefix}_prompt",
                             placeholder="(word:1.2), [from:to:when], [a|b], BREAK")
    c["negative_prompt"] = gr.Textbox(label=t("Negative prompt"), lines=2, elem_id=f"{prefix}_negative_prompt")
    with gr.Row():
        c["sampler"] = gr.Dropdown(list(samplers()), value="DPM++ 2M", label=t("Sampling method"),
                                   elem_id=f"{prefix}_sampler")
        c["schedule"] = gr.Dropdown(schedule_names(), value="Automatic", label=t("Schedule type"),
                                    elem_id=f"{prefix}_schedule")
    c["steps"] = gr.Slider(1, 150, 20, step=1, label=t("Sampling steps"), elem_id=f"{prefix}_steps")
    with gr.Row():
        c["width"] = gr.Slider(64, 2048, side, step=8, label=t("Width"), elem_id=f"{prefix}_width")
        c["height"] = gr.Slider(64, 2048, side, step=8, label=t("Height"), elem_id=f"{prefix}_height")
    with gr.Row():
        c["batch_count"] = gr.Slider(1, 100, 1, step=1, label=t("Batch count"), elem_id=f"{prefix}_batch_count")
        c["batch_size"] = gr.Slider(1, 8, 1, step=1, label=t("Batch size"), elem_id=f"{prefix}_batch_size")
    c["cfg_scale"] = gr.Slider(1, 30, 7, step=0.5, label=t("CFG scale"), elem_id=f"{prefix}_cfg_scale")
    c["seed"] = gr.Number(-1, label=t("Seed (-1 = random)"), precision=0, elem_id=f"{prefix}_seed")
    return c


def output_column(gr, prefix: str) -> dict:
    """Generate / Interrupt / Skip, the status line, the gallery (each picture whole, small ones
    scaled up without smoothing), the infotext and the "Send to" buttons."""
    o: dict = {}
    with gr.Row():
        o["go"] = gr.Button(t("Generate"), variant="primary", elem_id=f"{prefix}_generate", scale=2)
        o["interrupt"] = gr.Button(t("Interrupt"), elem_id=f"{prefix}_interrupt", scale=1)
        o["skip"] = gr.Button(t("Skip"), elem_id=f"{prefix}_skip", scale=1)
    o["status"] = gr.Markdown("", elem_id=f"{prefix}_status")
    o["gallery"] = gr.Gallery(label=t("Output"), columns=2, height="auto", object_fit="contain", preview=False,
                              fit_columns=False, elem_id=f"{prefix}_gallery", elem_classes=["dq-gallery"],
                              format="png")
    with gr.Row():
        o["to_img2img"] = gr.Button(t("Send to img2img"), size="sm", elem_id=f"{prefix}_send_to_img2img")
        o["to_inpaint"] = gr.Button(t("Send to inpaint"), size="sm", elem_id=f"{prefix}_send_to_inpaint")
        o["to_extras"] = gr.Button(t("Send to Extras"), size="sm", elem_id=f"{prefix}_send_to_extras")
        o["to_controlnet"] = gr.Button(t("Send to ControlNet"), size="sm", elem_id=f"{prefix}_send_to_controlnet")
    o["infotext"] = gr.Textbox(label=t("Generation parameters"), lines=4, interactive=False,
                               elem_id=f"{prefix}_infotext", buttons=["copy"])
    o["selected"] = gr.State(None)

    def on_select(evt: gr.SelectData, value):
        item = value[evt.index] if value and isinstance(evt.index, int) and evt.index < len(value) else None
        path, text = item_path(item), ""
        if path:
            try:
                text = read_infotext(path)
            except DanqingError:
                pass
        return path, text

    o["gallery"].select(on_select, inputs=[o["gallery"]], outputs=[o["selected"], o["infotext"]])
    # After a run the first image is the selected one (so "Send to" works without a click).
    o["gallery"].change(lambda v: item_path(v[0]) if v else None, inputs=[o["gallery"]], outputs=[o["selected"]])
    return o


def hires_controls(gr, state, c: dict) -> None:
    with gr.Accordion(t("Hires fix"), open=False):
        c["enable_hr"] = gr.Checkbox(False, label=t("Enable hires fix"))
        with gr.Row():
            c["hr_upscaler"] = gr.Dropdown(hires_upscalers(state.worker.studio.upscalers), value="Latent",
                                           label=t("Upscaler"))
            c["hr_scale"] = gr.Slider(1, 4, 2, step=0.05, label=t("Upscale by"))
        with gr.Row():
            c["hr_second_pass_steps"] = gr.Slider(0, 150, 0, step=1, label=t("Hires steps (0 = same)"))
            c["denoising_strength"] = gr.Slider(0, 1, 0.7, step=0.01, label=t("Denoising strength"))
        with gr.Row():
            c["hr_resize_x"] = gr.Slider(0, 4096, 0, step=8, label=t("Resize width to"))
            c["hr_resize_y"] = gr.Slider(0, 4096, 0, step=8, label=t("Resize height to"))
        c["hr_sampler_name"] = gr.Dropdown(["Use same sampler"] + list(samplers()), value="Use same sampler",
                                           label=t("Hires sampler"))
        c["hr_prompt"] = gr.Textbox(label=t("Hires prompt (empty = same)"), lines=1)
        c["hr_negative_prompt"] = gr.Textbox(label=t("Hires negative prompt (empty = same)"), lines=1)


def controlnet_controls(gr, state, prefix: str, clip: bool = False) -> list:
    """(image, model, module, weight, mode) of one ControlNet unit; with ``clip`` (the Video tab)
    a sixth: a clip whose frames are the frames' maps, in place of the image."""
    with gr.Accordion(t("ControlNet"), open=False):
        image = gr.Image(type="pil", label=t("Control image (a map, or a picture + preprocessor)"),
                         sources=["upload", "clipboard"], elem_id=f"{prefix}_controlnet_image", image_mode="RGB")
        video = (gr.Video(label=t("Or a control clip (frame i is frame i's map)"), sources=["upload"],
                          elem_id=f"{prefix}_controlnet_video") if clip else None)
        with gr.Row():
            model = gr.Dropdown([e.name for e in state.registry.scan("controlnet")], value=None,
                                label=t("ControlNet model"), elem_id=f"{prefix}_controlnet_model")
            module = gr.Dropdown(preprocessor_names(), value="none", label=t("Preprocessor"),
                                 elem_id=f"{prefix}_controlnet_module")
        with gr.Row():
            weight = gr.Slider(0, 2, 1, step=0.05, label=t("Control weight"))
            mode = gr.Dropdown(list(CONTROL_MODES), value="Balanced", label=t("Control mode"))
    return [image, model, module, weight, mode] + ([video] if clip else [])


def with_controlnet(fields: dict, unit) -> dict:
    """``fields`` with the unit of ``controlnet_controls``' values, when it has a picture (or a
    clip: its file, as Gradio hands a ``gr.Video``, read whole and kept once the request is
    accepted)."""
    image, model, module, weight, mode, *video = unit
    if video and video[0]:
        if image is not None:
            raise DanqingError("controlnet: give the control image or the control clip, not both")
        image = ClipUpload(Path(video[0]).read_bytes())
    if image is not None:
        if not model:
            raise DanqingError("controlnet: choose a ControlNet model for the control image")
        fields["controlnet"] = [{"model": model, "image": image,  # stored once the request is accepted
                                 "module": module or "none", "weight": float(weight), "control_mode": mode}]
    return fields


def txt2img_tab(gr, state, top: dict, opts, side: int) -> dict:
    """Left: prompt, sampling, variation seed, hires fix, ControlNet. Right: the output column."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            c = common_controls(gr, "txt2img", side)
            with gr.Accordion(t("Variation seed and clip skip"), open=False):
                with gr.Row():
                    c["subseed"] = gr.Number(-1, label=t("Variation seed"), precision=0, elem_id="txt2img_subseed")
                    c["subseed_strength"] = gr.Slider(0, 1, 0, step=0.01, label=t("Variation strength"))
                with gr.Row():
                    c["clip_skip"] = gr.Slider(1, 12, opts["CLIP_stop_at_last_layers"], step=1, label=t("Clip skip"))
                    c["rng"] = gr.Radio(["cpu", "gpu"], value="cpu", label=t("RNG"))
            hires_controls(gr, state, c)
            cn = controlnet_controls(gr, state, "txt2img")
            c["controlnet_image"] = cn[0]
        with gr.Column(scale=1):
            o = output_column(gr, "txt2img")
    c.update(o)

    def add_picked(kind):
        def add(name, prompt):
            """A1111's extra-network cards: picking a LoRA / embedding appends it to the prompt."""
            if not name:
                return gr.update(), gr.update()
            return add_network(prompt, kind, name), gr.update(value=None)
        return add

    top["lora"].change(add_picked("lora"), [top["lora"], c["prompt"]], [c["prompt"], top["lora"]])
    top["embedding"].change(add_picked("embedding"), [top["embedding"], c["prompt"]], [c["prompt"], top["embedding"]])

    def txt2img(*values):
        values, unit = values[:-5], values[-5:]
        fields = dict(zip(TXT2IMG_FIELDS, values[:-2]))
        fields["model"], fields["vae"] = values[-2], values[-1]
        try:
            fields = with_controlnet(clean(fields), unit)
            family = family_of(state.registry, fields["model"])  # IF, unCLIP, Kandinsky: what they take
            if family is not None:
                check_fields(family, fields, picture=False)
        except DanqingError as exc:
            raise gr.Error(str(exc)) from None
        yield from run_job(state, fields)

    o["go"].click(txt2img, inputs=[c[k] for k in TXT2IMG_FIELDS] + [top["model"], top["vae"], *cn],
                  outputs=[o["gallery"], o["infotext"], o["status"]], concurrency_limit=None)
    o["interrupt"].click(lambda: state.worker.interrupt() and None, queue=False)
    o["skip"].click(lambda: state.worker.skip() and None, queue=False)
    return c


def editor_mask(value) -> tuple[Image.Image | None, Image.Image | None]:
    """(picture, mask) of the image editor's value: the background is the picture; every pixel
    painted on a layer (alpha > 0) is white in the mask (repaint), the rest black (keep).
    No paint: no mask."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"]
    if not isinstance(background, Image.Image):
        background = Image.fromarray(np.asarray(background))
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        if layer.size != background.size:
            layer = layer.resize(background.size, Image.NEAREST)
        painted |= np.asarray(layer.convert("RGBA"))[..., 3] > 0
    mask = Image.fromarray((painted * 255).astype(np.uint8), "L") if painted.any() else None
    return background.convert("RGB"), mask


def sketch_picture(value) -> Image.Image | None:
    """The sketch tab's picture: the editor's composite (background with the strokes drawn on it)."""
    if not value or value.get("composite") is None:
        return None
    comp = value["composite"]
    comp = comp if isinstance(comp, Image.Image) else Image.fromarray(np.asarray(comp))
    if comp.mode == "RGBA":
        flat = Image.new("RGB", comp.size, (255, 255, 255))
        flat.paste(comp, mask=comp.split()[3])
        return flat
    return comp.convert("RGB")


def img2img_tab(gr, state, top: dict, side: int) -> dict:
    """Left: the picture (img2img upload, sketch, or inpaint with a brush mask), the prompt and
    settings, inpaint options, ControlNet. Right: the output column."""
    brush = gr.Brush(colors=[MASK_COLOUR], default_color=MASK_COLOUR, color_mode="fixed", default_size=12)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            with gr.Tabs() as modes:
                with gr.Tab(t("img2img"), id="img2img_mode_upload") as tab_upload:
                    init = gr.Image(type="pil", label=t("Init image"), sources=["upload", "clipboard"],
                                    elem_id="img2img_init", image_mode="RGB")
                with gr.Tab(t("Sketch"), id="img2img_mode_sketch") as tab_sketch:
                    sketch = gr.ImageEditor(type="pil", label=t("Sketch (the drawing is the init image)"),
                                            elem_id="img2img_sketch", image_mode="RGBA",
                                            brush=gr.Brush(color_mode="defaults"), layers=False,
                                            sources=["upload", "clipboard"], transforms=())
                with gr.Tab(t("Inpaint"), id="img2img_mode_inpaint") as tab_inpaint:
                    editor = gr.ImageEditor(type="pil", label=t("Inpaint: paint the area to redraw"),
                                            elem_id="img2img_inpaint", image_mode="RGBA", brush=brush,
                                            layers=False, sources=["upload", "clipboard"], transforms=(),
                                            canvas_size=(side, side))
            mode = gr.State("upload")
            c = common_controls(gr, "img2img", side)
            with gr.Row():
                c["denoising_strength"] = gr.Slider(0, 1, 0.75, step=0.01, label=t("Denoising strength"),
                                                    elem_id="img2img_denoising_strength")
                c["resize_mode"] = gr.Dropdown(["just resize", "crop and resize", "resize and fill", "latent upscale"],
                                               value="just resize", label=t("Resize mode"))
            with gr.Accordion(t("Inpaint settings"), open=False, elem_id="img2img_inpaint_settings"):
                with gr.Row():
                    c["mask_blur"] = gr.Slider(0, 64, 4, step=1, label=t("Mask blur"), elem_id="img2img_mask_blur")
                    c["inpainting_fill"] = gr.Dropdown(["fill", "original", "latent noise", "latent nothing"],
                                                       value="original", label=t("Masked content"))
                with gr.Row():
                    c["inpaint_full_res"] = gr.Checkbox(False, label=t("Only masked"))
                    c["inpaint_full_res_padding"] = gr.Slider(0, 256, 32, step=4, label=t("Only masked padding"))
                    c["inpainting_mask_invert"] = gr.Checkbox(False, label=t("Inpaint not masked"))
            cn = controlnet_controls(gr, state, "img2img")
        with gr.Column(scale=1):
            o = output_column(gr, "img2img")
    c.update(o)
    c.update(init=init, sketch=sketch, editor=editor, modes=modes, mode=mode, controlnet_image=cn[0])
    for tab, name in ((tab_upload, "upload"), (tab_sketch, "sketch"), (tab_inpaint, "inpaint")):
        tab.select(lambda n=name: n, outputs=[mode], queue=False)

    def img2img(init_img, mode_name, sketch_value, editor_value, *values):
        mask = None
        if mode_name == "inpaint":
            init_img, mask = editor_mask(editor_value)
            if init_img is not None and mask is None:
                raise gr.Error("mask: nothing is painted; paint the area to redraw with the Inpaint tab's brush "
                               "(or use the img2img tab to redraw the whole picture)")
            if init_img is not None and mask is None:
                raise gr.Error("mask: nothing is painted; paint the area to redraw with the Inpaint tab's brush "
                               "(or use the img2img tab to redraw the whole picture)")
        elif mode_name == "sketch":
            init_img = sketch_picture(sketch_value)
        if init_img is None:
            raise gr.Error("init_image: drop a picture into the img2img, Sketch or Inpaint tab first")
        values, unit = values[:-5], values[-5:]
        fields = dict(zip(IMG2IMG_FIELDS, values[:-2]))
        fields["model"], fields["vae"] = values[-2], values[-1]
        try:
            fields = with_controlnet(clean(fields), unit)
        except DanqingError as exc:
            raise gr.Error(str(exc)) from None
        yield from run_job(state, fields, init_image=init_img, mask=mask)

    o["go"].click(img2img, inputs=[init, mode, sketch, editor] + [c[k] for k in IMG2IMG_FIELDS]
                  + [top["model"], top["vae"], *cn], outputs=[o["gallery"], o["infotext"], o["status"]],
                  concurrency_limit=None, api_name="img2img")
    o["interrupt"].click(lambda: state.worker.interrupt() and None, queue=False)
    o["skip"].click(lambda: state.worker.skip() and None, queue=False)
    return c
