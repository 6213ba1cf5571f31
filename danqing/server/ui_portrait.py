"""The web UI's "Portrait studio" tab (``danqing app portrait``): photos of one person dropped in
-> each photo's verdict (accepted, or rejected with its reason) and the contact sheet; Train ->
the person's LoRA as a job of the training queue (step, loss); Generate -> N portraits in a
style template, ranked by face similarity, as a gallery (rank and score under each). The buttons
do what the job API does (``server/portrait.py``, ``server/train.py``).
"""

# No ``from __future__ import annotations``: Gradio reads the handlers' annotations at run time.
from pathlib import Path

from danqing.apps.portrait_train import RECIPES
from danqing.errors import DanqingError
from danqing.server.portrait import add_person, prepare_portrait
from danqing.server.train import ACTIVE, TrainJobSubmit
from danqing.server.ui_i18n import t, table
from danqing.server.ui_media import follow
from danqing.server.ui_train import status_line

VERDICT_COLUMNS = ["photo", "verdict", "reason"]


def ranked_gallery(job) -> list:
    """(picture, caption) of a finished portrait job, best first: the rank and the identity score."""
    out = []
    for f in job.result["files"]:
        score = "unscored (no face found)" if f["score"] is None else f"score {f['score']:.3f}"
        out.append((f["path"], f"#{f['rank']} {score}, seed {f['seed']}" + (", fused" if f["fused"] else "")))
    return out


def portrait_tab(gr, state):
    """Person and photos; Add, Train and Generate; the verdicts, the contact sheet, the training
    status and the ranked gallery."""
    from danqing.apps.portrait_styles import load_styles

    try:
        styles = list(load_styles(state.settings.home))
    except DanqingError:   # a broken template of the home's: the tab still opens, Generate names it
        styles = []
    with gr.Row():
        with gr.Column():
            name = gr.Textbox(value="", label=t("Person name"), elem_id="portrait_name")
            photos = gr.File(label=t("Photos of the person"), file_count="multiple", file_types=["image"],
                             type="filepath", elem_id="portrait_photos")
            with gr.Row():
                size = gr.Number(value=512, precision=0, minimum=64, maximum=2048, label=t("Crop size"),
                                 elem_id="portrait_size")
                least = gr.Number(value=3, precision=0, minimum=1, label=t("Photos needed"), elem_id="portrait_min")
            add = gr.Button(t("Add person"), variant="primary", elem_id="portrait_add")
            with gr.Row():
                recipe = gr.Dropdown(list(RECIPES), value="course", label=t("Recipe"), elem_id="portrait_recipe")
                steps = gr.Number(value=0, precision=0, minimum=0, label=t("Steps (0: the recipe's)"),
                                  elem_id="portrait_steps")
            train = gr.Button(t("Train the person's LoRA"), elem_id="portrait_train")
            with gr.Row():
                style = gr.Dropdown(styles, value=styles[0] if styles else None, label=t("Style"),
                                    elem_id="portrait_style", allow_custom_value=True)
                n = gr.Number(value=4, precision=0, minimum=1, maximum=32, label=t("Pictures"), elem_id="portrait_n")
                keep = gr.Number(value=4, precision=0, minimum=1, maximum=32, label=t("Keep the best"),
                                 elem_id="portrait_keep")
            fuse = gr.Slider(0, 1, value=0, step=0.05, label=t("Face fusion (0: off)"), elem_id="portrait_fuse")
            generate = gr.Button(t("Generate portraits"), variant="primary", elem_id="portrait_generate")
        with gr.Column():
            status = gr.Markdown(elem_id="portrait_status")
            verdicts = gr.Dataframe(headers=VERDICT_COLUMNS, value=None, interactive=False, wrap=True,
                                    label=t("Photos"), elem_id="portrait_verdicts", visible=False)
            sheet = gr.Image(label=t("Contact sheet"), type="filepath", interactive=False, elem_id="portrait_sheet")
            train_status = gr.Markdown(elem_id="portrait_train_status")
            preview = gr.Image(label=t("Preview"), interactive=False, elem_id="portrait_preview")
            gallery = gr.Gallery(label=t("Ranked portraits"), columns=4, height="auto", elem_id="portrait_gallery")

    def do_add(who, files, side, need, request: gr.Request):
        if not files:
            raise gr.Error("photos: drop photos of the person first")
        try:
            made = add_person(state, (who or "").strip(), [Path(f).read_bytes() for f in files],
                              names=[Path(f).name for f in files], size=int(side), min_photos=int(need))
        except DanqingError as exc:
            raise gr.Error(str(exc).splitlines()[0]) from None
        rows = [[v["photo"], "accepted" if v["accepted"] else "rejected", v["reason"]] for v in made["verdicts"]]
        person = Path(made["folder"])
        # the headers in the browser's language (Gradio translates no table headers; the queue tab's way)
        zh = table()["zh-CN"] if "zh" in (request.headers.get("accept-language", "") if request else "")[:8] else {}
        shown = gr.update(value={"headers": [zh.get(h, h) for h in VERDICT_COLUMNS], "data": rows}, visible=True)
        return shown, str(person / "contact-sheet.png"), \
            f"**{made['name']}**: {made['accepted']} of {len(rows)} photos accepted"

    def do_train(who, how, count):
        queue = state.train
        fields = {"person": (who or "").strip(), "name": (who or "").strip(), "recipe": how}
        if count:
            fields["steps"] = int(count)
        try:
            job = queue.submit(queue.prepare(TrainJobSubmit(**fields)))
        except (DanqingError, ValueError) as exc:
            raise gr.Error(str(exc).splitlines()[0]) from None
        while True:
            view = queue.wait(job.id, 0.5).view()
            yield status_line(view)
            if view["status"] not in ACTIVE:
                return

    def do_generate(who, picked, count, best, strength):
        who = (who or "").strip()
        fields = {"person": who, "style": picked or "", "n": int(count), "keep": int(best),
                  "fuse": float(strength) or None}
        if (Path(state.registry.folder("lora")) / f"{who}.safetensors").is_file():
            fields["lora"] = who   # the person's LoRA, once trained
        steps = follow(state, lambda: prepare_portrait(state, fields))
        while True:
            try:
                shown, line = next(steps)
            except StopIteration as end:
                job = end.value
                break
            yield shown, line, gr.skip()
        yield gr.skip(), f"done: {len(job.result['files'])} of {int(count)} kept", ranked_gallery(job)

    add.click(do_add, [name, photos, size, least], [verdicts, sheet, status])
    train.click(do_train, [name, recipe, steps], [train_status])
    generate.click(do_generate, [name, style, n, keep, fuse], [preview, status, gallery])
