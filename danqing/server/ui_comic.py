"""The web UI's "Comic" tab: a storyboard editor (TOML, prefilled with an example on the bundled
model), Draft -> the contact sheet, a panel number + Re-roll, Render -> the
page and its files (PNG pages, PDF, CBZ). Each button queues the same job as the job API
(``server/comic.py``) and shows what the worker reports: panels done, the latest panel.
"""

# No ``from __future__ import annotations``: Gradio reads the handlers' annotations at run time.
from danqing.server.comic import prepare_comic
from danqing.server.ui_i18n import t
from danqing.server.ui_media import files_of, follow

EXAMPLE = '''title = "The blue star's day"
model = "danqing-tiny"
sampler = "DPM++ 2M"
schedule = "Karras"
steps = 20
seed = 100
hires_scale = 1            # danqing-tiny paints 64 px; 2 on a real model

[characters.star]
trigger = "a blue star"    # with a character LoRA: tags = "<lora:NAME:0.8>"

[layout]
columns = 3

[[panels]]
scene = "{star} left of a red circle"
caption = "Morning"
bubbles = [{ text = "Hello!", x = 0.7, y = 0.2 }]

[[panels]]
scene = "{star} right of a green square"
caption = "中午"

[[panels]]
scene = "{star} left of a yellow circle"
caption = "The end"
'''


def comic_tab(gr, state):
    """Project name and storyboard; Draft, Re-roll (one panel) and Render buttons; the contact
    sheet, the page and the files."""
    with gr.Row():
        with gr.Column():
            project = gr.Textbox(value="my-comic", label=t("Project name"), elem_id="comic_project")
            story = gr.Textbox(value=EXAMPLE, lines=24, max_lines=80, label=t("Storyboard (TOML)"),
                               elem_id="comic_storyboard")
            draft = gr.Button(t("Draft"), variant="primary", elem_id="comic_draft")
            with gr.Row():
                panel = gr.Number(value=1, precision=0, minimum=1, label=t("Panel to re-roll"), elem_id="comic_panel")
                reroll = gr.Button(t("Re-roll panel"), elem_id="comic_reroll")
            render = gr.Button(t("Render page"), variant="primary", elem_id="comic_render")
        with gr.Column():
            status = gr.Textbox(label=t("Status"), interactive=False, elem_id="comic_status")
            sheet = gr.Image(label=t("Contact sheet"), type="filepath", interactive=False, elem_id="comic_sheet")
            page = gr.Image(label=t("Comic page"), type="filepath", interactive=False, elem_id="comic_page")
            files = gr.File(label=t("Files"), file_count="multiple", interactive=False, elem_id="comic_files")

    def run(name, text, action, number=None):
        """Queue one action; yields (latest panel or skip, status line), returns the finished job."""
        fields = {"project": (name or "").strip(), "storyboard": text or "", "action": action}
        if number is not None:
            fields["panel"] = int(number)
        return (yield from follow(state, lambda: prepare_comic(state, fields)))

    def panels_line(job) -> str:
        return f"done: {job.request.action}, seeds {job.result['seeds']}"

    def do_draft(name, text):
        job = yield from run(name, text, "draft")
        yield files_of(job, "files")["png"], panels_line(job)

    def do_reroll(name, text, number):
        job = yield from run(name, text, "reroll", number)
        yield files_of(job, "files")["png"], panels_line(job)

    def do_render(name, text):
        steps = run(name, text, "render")
        while True:
            try:
                preview, line = next(steps)
            except StopIteration as end:
                job = end.value
                break
            yield preview, line, gr.skip()
        made = [f["path"] for f in job.result["files"]]
        yield next(p for p in made if p.endswith(".png")), panels_line(job), made

    draft.click(do_draft, [project, story], [sheet, status])
    reroll.click(do_reroll, [project, story, panel], [sheet, status])
    render.click(do_render, [project, story], [page, status, files])
