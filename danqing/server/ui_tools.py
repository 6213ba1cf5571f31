"""The web UI's tool tabs: Extras (upscale, face restoration, a batch of uploads), Checkpoint
merger, Train, Queue, History, PNG Info and Settings.

Extras run the library functions of A1111's Extras routes (``server/a1111_extras.py``) beside
the job queue, as A1111 runs them. Files reach these tabs only as uploads or danqing's outputs
(``server/ui_files.py``).
"""

# No ``from __future__ import annotations``: Gradio reads the handlers' annotations at run time.
from pathlib import Path

from danqing.errors import DanqingError, InvalidRequest
from danqing.models.names import check_new_name
from danqing.server.a1111_extras import ExtrasBody, check_extras, extras_picture
from danqing.server.common import infotext_of_image
from danqing.server.security import open_image
from danqing.server.store import TERMINAL
from danqing.server.ui_common import shown_file
from danqing.server.ui_files import REFUSED, allowed_file, upload_folder
from danqing.server.ui_i18n import t, table

MERGE_METHODS = ("weighted-sum", "add-difference")
QUEUE_COLUMNS = ["id", "status", "kind", "source", "prompt", "ahead"]
HISTORY_PAGE = 24


def _read_upload(state, path) -> bytes:
    """The bytes of a file Gradio stored from an upload (checked again here, after UIFileGuard)."""
    path = path if isinstance(path, str) else getattr(path, "name", None) or str(path)
    if not allowed_file(str(path), [upload_folder()]):
        raise InvalidRequest("image", REFUSED)
    with open(path, "rb") as f:
        raw = f.read(state.server.max_upload_bytes + 1)
    if len(raw) > state.server.max_upload_bytes:
        raise InvalidRequest("image", f"more than the limit of {state.server.max_upload_bytes} bytes")
    return raw


def extras_tab(gr, state) -> dict:
    """One picture or a batch of uploaded pictures: upscale (two upscalers, blended), GFPGAN."""
    ups = ["None"] + state.worker.studio.upscalers.names()
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            with gr.Tabs():
                with gr.Tab(t("Single image")):
                    image = gr.Image(type="pil", label=t("Source"), sources=["upload", "clipboard"],
                                     elem_id="extras_image", image_mode="RGB")
                with gr.Tab(t("Batch from files")):
                    batch = gr.File(label=t("Pictures (drop several)"), file_count="multiple", file_types=["image"],
                                    elem_id="extras_batch")
            with gr.Row():
                resize = gr.Slider(1, 8, 2, step=0.05, label=t("Resize"), elem_id="extras_resize")
                up1 = gr.Dropdown(ups, value="Lanczos" if "Lanczos" in ups else ups[0], label=t("Upscaler 1"),
                                  elem_id="extras_upscaler_1")
            with gr.Row():
                up2 = gr.Dropdown(ups, value="None", label=t("Upscaler 2"), elem_id="extras_upscaler_2")
                vis2 = gr.Slider(0, 1, 0, step=0.01, label=t("Upscaler 2 visibility"))
            gfpgan = gr.Slider(0, 1, 0, step=0.01, label=t("GFPGAN visibility (face restoration)"))
        with gr.Column(scale=1):
            go = gr.Button(t("Generate"), variant="primary", elem_id="extras_generate")
            gallery = gr.Gallery(label=t("Output"), columns=2, height="auto", object_fit="contain", fit_columns=False,
                                 elem_id="extras_gallery", elem_classes=["dq-gallery"], format="png")
            info = gr.Textbox(label=t("Postprocessing"), lines=2, interactive=False, elem_id="extras_info")

    def run_extras(img, files, factor, upscaler_1, upscaler_2, visibility_2, gfpgan_visibility):
        try:
            pictures = [img] if img is not None else [
                open_image(_read_upload(state, f), f"files.{i}", state.limits) for i, f in enumerate(files or [])]
            if not pictures:
                raise InvalidRequest("image", "drop a picture (or several under Batch from files) first")
            if len(pictures) > state.server.max_batch_images:
                raise InvalidRequest("files", f"{len(pictures)} pictures is more than the limit of "
                                              f"{state.server.max_batch_images} (max_batch_images)")
            body = ExtrasBody(upscaling_resize=float(factor), upscaler_1=upscaler_1, upscaler_2=upscaler_2,
                              extras_upscaler_2_visibility=float(visibility_2),
                              gfpgan_visibility=float(gfpgan_visibility))
            plan = check_extras(state, body, [p.size for p in pictures])
            out = [extras_picture(state.worker.studio, p, body, plan) for p in pictures]
        except DanqingError as exc:
            raise gr.Error(str(exc)) from None
        return [img for img, _ in out], ", ".join(f"{k}: {v}" for k, v in out[-1][1].items())

    go.click(run_extras, inputs=[image, batch, resize, up1, up2, vis2, gfpgan], outputs=[gallery, info],
             api_name="extras")
    return {"image": image}


def merger_tab(gr, state) -> None:
    """A1111's checkpoint merger: weighted sum or add difference into models/checkpoints."""
    names = [e.name for e in state.registry.scan("checkpoint")]
    with gr.Row():
        a = gr.Dropdown(names, value=None, label=t("Primary model (A)"), elem_id="merge_a")
        b = gr.Dropdown(names, value=None, label=t("Secondary model (B)"), elem_id="merge_b")
        c = gr.Dropdown(names, value=None, label=t("Tertiary model (C, add difference only)"), elem_id="merge_c")
    with gr.Row():
        method = gr.Radio(list(MERGE_METHODS), value="weighted-sum", label=t("Interpolation method"))
        alpha = gr.Slider(0, 1, 0.3, step=0.05, label=t("Multiplier (M)"), elem_id="merge_alpha")
    with gr.Row():
        name = gr.Textbox(label=t("Custom name (letters, digits, - and _)"), elem_id="merge_name")
        half = gr.Checkbox(False, label=t("Save as float16"))
    go = gr.Button(t("Merge"), variant="primary", elem_id="merge_go")
    note = gr.Markdown("", elem_id="merge_status")

    def merge(ma, mb, mc, how, m, new_name, fp16):
        from danqing.customise.merge import merge_checkpoints  # lazy: imports torch

        try:
            new_name = check_new_name(new_name, "name", "checkpoint")
            models = [ma, mb] + ([mc] if how == "add-difference" else [])
            if any(not x for x in models):
                raise InvalidRequest("models", f"{how} takes {len(models)} models: choose each")
            models = [state.model_name("checkpoint", x, "models") for x in models]
            out = Path(state.settings.models_dir) / "checkpoints" / f"{new_name}.safetensors"
            path = merge_checkpoints(state.registry, models, out, method=how, alpha=float(m), half=bool(fp16))
        except DanqingError as exc:
            raise gr.Error(str(exc)) from None
        return f"saved `{Path(path).name}` in models/checkpoints"

    go.click(merge, inputs=[a, b, c, method, alpha, name, half], outputs=[note])


def queue_tab(gr, state, demo) -> None:
    """The job store's jobs, newest first: queued, running and finished; cancel one by its id."""
    grid = gr.Dataframe(headers=QUEUE_COLUMNS, value=None, interactive=False, wrap=True,
                         elem_id="queue_table")
    with gr.Row():
        refresh = gr.Button(t("Refresh"), elem_id="queue_refresh", scale=0)
        job_id = gr.Textbox(label=t("Job id (click a row)"), elem_id="queue_job_id", scale=3)
        cancel = gr.Button(t("Cancel job"), variant="stop", elem_id="queue_cancel", scale=0)
    note = gr.Markdown("", elem_id="queue_status")

    def rows(request: gr.Request):
        """The table, its headers in the browser's language (Gradio translates no table headers)."""
        zh = table()["zh-CN"] if "zh" in (request.headers.get("accept-language", "") if request else "")[:8] else {}
        return {"headers": [zh.get(h, h) for h in QUEUE_COLUMNS], "data": _rows()}

    def _rows():
        out = []
        for job in state.store.history(limit=50):
            ahead = state.store.position(job) if job.status == "queued" else ""
            out.append([job.id, job.status, job.kind, job.source, job.prompt[:60], ahead])
        return out or [["", "", "", "", "", ""]]

    def pick(evt: gr.SelectData, data):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return str(data.iloc[row, 0]) if hasattr(data, "iloc") else str(data[row][0])
        except (IndexError, KeyError, TypeError):
            return ""

    def do_cancel(jid, request: gr.Request):
        jid = (jid or "").strip()
        job = state.store.get(jid) if jid else None
        if job is None:
            raise gr.Error(f"job_id: no job {jid!r}; click a row of the table")
        if job.status in TERMINAL:
            return rows(request), f"{jid}: already {job.status}"
        job = state.worker.cancel(jid)
        return rows(request), f"{jid}: {job.status if job else 'gone'}"

    refresh.click(rows, outputs=[grid])
    demo.load(rows, outputs=[grid])
    grid.select(pick, inputs=[grid], outputs=[job_id])
    cancel.click(do_cancel, inputs=[job_id], outputs=[grid, note])


def history_tab(gr, state, demo) -> dict:
    """The finished jobs' pictures, newest first, 24 a page; search by prompt; a click shows the infotext."""
    with gr.Row():
        query = gr.Textbox(label=t("Search prompts"), elem_id="history_query", scale=4)
        search = gr.Button(t("Search"), elem_id="history_search", scale=0)
        page = gr.Number(1, label=t("Page"), precision=0, minimum=1, elem_id="history_page", scale=0)
    gallery = gr.Gallery(label=t("History"), columns=6, height="auto", elem_id="history_gallery",
                         elem_classes=["dq-gallery"])
    info = gr.Textbox(label=t("Generation parameters"), lines=4, interactive=False, elem_id="history_infotext")
    texts = gr.State([])

    def do_search(q, n):
        items, found = [], []
        n = max(1, int(n or 1))
        for job in state.store.history(query=q or "", status="done", limit=HISTORY_PAGE, offset=(n - 1) * HISTORY_PAGE):
            for img in job.result["images"]:
                if img.get("path"):
                    items.append((shown_file(state, img["path"]), job.prompt[:80]))
                    found.append(img["infotext"])
        return items, found, ""

    for event in (search.click, query.submit, page.change, demo.load):
        event(do_search, inputs=[query, page], outputs=[gallery, texts, info])

    def hist_select(evt: gr.SelectData, values):
        return values[evt.index] if isinstance(evt.index, int) and evt.index < len(values) else ""

    gallery.select(hist_select, inputs=[texts], outputs=[info])
    return {"gallery": gallery}


def png_info_tab(gr, state) -> None:
    """Drop a picture, read its generation parameters (the file is read from Gradio's upload cache)."""
    png = gr.File(label=t("Drop a PNG/JPEG/WebP here"), file_types=["image"], elem_id="pnginfo_file")
    text = gr.Textbox(label=t("Parameters"), lines=6, interactive=False, elem_id="pnginfo_text")

    def png_info(file):
        if file is None:
            return ""
        try:  # UIFileGuard let only uploads through; checked again before the file is opened
            found = infotext_of_image(open_image(_read_upload(state, file), "image", state.limits))
        except DanqingError as exc:
            raise gr.Error(str(exc)) from None
        return found or "(no generation parameters in this picture)"

    png.change(png_info, inputs=[png], outputs=[text], api_name="png_info")


def settings_tab(gr, state, top: dict, opts) -> None:
    set_clip = gr.Slider(1, 12, opts["CLIP_stop_at_last_layers"], step=1, label=t("Default clip skip"))
    save = gr.Button(t("Apply settings (checkpoint, VAE, clip skip)"), elem_id="settings_apply")
    gr.Markdown(t("Current defaults:"))
    note = gr.Markdown(settings_md(state), elem_classes=["dq-data"])

    def apply_settings(model_name, vae_name, clip):
        try:
            state.set_options({"sd_model_checkpoint": model_name, "sd_vae": vae_name,
                               "CLIP_stop_at_last_layers": int(clip)})
        except DanqingError as exc:
            raise gr.Error(str(exc)) from None
        return settings_md(state)

    save.click(apply_settings, inputs=[top["model"], top["vae"], set_clip], outputs=[note])


def settings_md(state) -> str:
    o = state.options()
    return (f"checkpoint **{o['sd_model_checkpoint']}**, VAE **{o['sd_vae']}**, "
            f"clip skip **{o['CLIP_stop_at_last_layers']}**. Outputs: `{state.settings.outputs_dir}`; "
            f"database: `{state.store.where()}`.")
