"""The Train tab of the web UI: a LoRA, a textual-inversion embedding or a DreamBooth checkpoint
trained on a dataset folder of ``HOME/datasets/`` through the server's training jobs
(``server/train.py``), with its live loss curve and sample grids (polled every second while the
tab is open)."""

from __future__ import annotations

from PIL import Image

from danqing.errors import DanqingError
from danqing.server.common import JobFailed
from danqing.server.train import KINDS, TrainJobSubmit
from danqing.server.train_datasets import new_dataset
from danqing.server.ui_i18n import t


def loss_frame(job: dict | None):
    """The loss curve of a job view (``TrainJob.view``) as the LinePlot's table."""
    import pandas as pd  # gradio's own dependency

    points = [p for p in (job or {}).get("losses", []) if p["loss"] is not None]
    return pd.DataFrame({"step": [p["step"] for p in points], "loss": [p["loss"] for p in points]})


USE = {"lora": "`<lora:{name}:1>` in a prompt", "textual-inversion": "the word `{name}` in a prompt",
       "dreambooth": "the checkpoint `{name}` (Refresh models)"}  # how a finished job's result is used


def status_line(job: dict | None) -> str:
    if not job:
        return ""
    loss = f", loss {job['loss']:.4f}" if job.get("loss") is not None else ""
    line = f"**{job['status']}** {job.get('kind', 'lora')} {job['name']}: step {job['step']}/{job['total']}{loss}"
    if job.get("error"):
        line += f"\n\n{job['error']}"
    if job["status"] == "done":
        line += "\n\n" + USE[job.get("kind", "lora")].format(name=job["name"])
    return line


KIND_CHOICES = (("LoRA", "lora"), ("Textual inversion", "textual-inversion"), ("DreamBooth", "dreambooth"))


def submit_body(kind: str, common: dict, own: dict) -> TrainJobSubmit:
    """The job of the tab's fields: the common ones and those of the picked kind only."""
    fields = KINDS[kind].fields
    return TrainJobSubmit(kind=kind, **common, **{k: v for k, v in own.items() if k in fields})


def train_tab(gr, state) -> dict:
    """Kind, dataset, name and settings; Start / Cancel; status, loss curve and samples of the job."""
    queue = state.train
    with gr.Row():
        with gr.Column():
            kind = gr.Radio([(t(label), value) for label, value in KIND_CHOICES], value="lora", label=t("Train"),
                            elem_id="train_kind")
            with gr.Row():
                dataset = gr.Dropdown(queue.datasets(), label=t("Dataset (a folder of HOME/datasets/)"),
                                      elem_id="train_dataset", allow_custom_value=False)
                refresh = gr.Button(t("Refresh"), scale=0, elem_id="train_refresh")
            with gr.Accordion(t("Upload a dataset (.zip of pictures with .txt captions)"), open=False):
                with gr.Row():
                    upload = gr.File(label=t("Dataset .zip"), file_types=[".zip"], type="filepath",
                                     elem_id="train_upload")
                    with gr.Column():
                        upload_name = gr.Textbox(label=t("New dataset name"), elem_id="train_upload_name")
                        upload_go = gr.Button(t("Upload dataset"), elem_id="train_upload_go")
            name = gr.Textbox(label=t("Name (of the LoRA, the embedding's word or the checkpoint)"), elem_id="train_name")
            with gr.Row():
                steps = gr.Number(200, label=t("Steps"), precision=0, minimum=1, elem_id="train_steps")
                lr = gr.Number(KINDS["lora"].lr, label=t("Learning rate"), elem_id="train_lr")
                batch = gr.Number(2, label=t("Batch size"), precision=0, minimum=1, elem_id="train_batch")
            with gr.Row():
                side = gr.Number(64, label=t("Resolution"), precision=0, minimum=16, elem_id="train_resolution")
                every = gr.Number(50, label=t("Sample every N steps"), precision=0, minimum=1, elem_id="train_every")
                sample_steps = gr.Number(10, label=t("Sample steps"), precision=0, minimum=1,
                                         elem_id="train_sample_steps")
            text_encoder = gr.Checkbox(False, label=t("Train the text encoder too"), elem_id="train_text_encoder")
            with gr.Group(visible=True) as lora_box:
                rank = gr.Number(8, label=t("Rank"), precision=0, minimum=1, elem_id="train_rank")
            with gr.Group(visible=False) as ti_box:
                with gr.Row():
                    init_word = gr.Textbox("shape", label=t("Initial word"), elem_id="train_init_word")
                    vectors = gr.Number(2, label=t("Vectors per word"), precision=0, minimum=1, elem_id="train_vectors")
            with gr.Group(visible=False) as db_box:
                instance = gr.Textbox(label=t("Instance prompt (empty: each image's caption)"), elem_id="train_instance")
                klass = gr.Textbox(label=t("Class prompt (empty: ordinary synthetic scenes)"), elem_id="train_class")
                with gr.Row():
                    prior = gr.Checkbox(True, label=t("Prior preservation"), elem_id="train_prior")
                    n_class = gr.Number(8, label=t("Class images"), precision=0, minimum=1, elem_id="train_class_images")
            with gr.Row():
                start = gr.Button(t("Start training"), variant="primary", elem_id="train_start")
                cancel = gr.Button(t("Cancel"), variant="stop", elem_id="train_cancel")
        with gr.Column():
            status = gr.Markdown("", elem_id="train_status")
            curve = gr.LinePlot(loss_frame(None), x="step", y="loss", label=t("Loss"), elem_id="train_loss")
            samples = gr.Gallery(label=t("Samples"), columns=2, elem_id="train_samples", elem_classes=["dq-gallery"])
    job_id = gr.State(None)
    timer = gr.Timer(1.0, active=True)

    def pick_kind(k):
        return (gr.update(visible=k == "lora"), gr.update(visible=k == "textual-inversion"),
                gr.update(visible=k == "dreambooth"), gr.update(visible="train_text_encoder" in KINDS[k].fields),
                KINDS[k].lr)

    def do_start(k, ds, nm, n, rate, b, s, e, ss, te, r, iw, v, inst, cls, pr, nc):
        try:
            common = {"dataset": ds or "", "name": nm or "", "steps": int(n), "lr": float(rate), "batch_size": int(b),
                      "resolution": int(s), "sample_every": int(e), "sample_steps": int(ss)}
            own = {"train_text_encoder": bool(te), "rank": int(r), "init_word": iw or "", "vectors": int(v),
                   "instance_prompt": inst or None, "class_prompt": cls or None, "prior_preservation": bool(pr),
                   "class_images": int(nc)}
            job = queue.submit(queue.prepare(submit_body(k, common, own)))
        except (DanqingError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc).splitlines()[0]) from None
        return job.id, status_line(job.view())

    def do_upload(path, new_name):
        if not path:
            raise gr.Error("file: drop a .zip of pictures with .txt captions first")
        try:
            made = new_dataset(queue.datasets_dir, (new_name or "").strip(), path)
        except DanqingError as exc:
            raise gr.Error(str(exc).splitlines()[0]) from None
        return gr.update(choices=queue.datasets(), value=made["dataset"]), \
            f"dataset **{made['dataset']}**: {made['images']} pictures, {made['captions']} captions"

    def do_cancel(jid):
        if jid:
            try:
                queue.cancel(jid)
            except JobFailed as exc:
                raise gr.Error(exc.detail) from None

    def poll(jid):
        if not jid:
            return gr.skip(), gr.skip(), gr.skip()
        job = queue.get(jid).view()
        pics = [Image.open(p).copy() for p in queue.get(jid).samples()]  # HOME/runs is not served: pictures go
        # through Gradio's cache
        return status_line(job), loss_frame(job), pics

    upload_go.click(do_upload, inputs=[upload, upload_name], outputs=[dataset, status])
    refresh.click(lambda: gr.update(choices=queue.datasets()), outputs=[dataset])
    kind.change(pick_kind, inputs=[kind], outputs=[lora_box, ti_box, db_box, text_encoder, lr])
    start.click(do_start, inputs=[kind, dataset, name, steps, lr, batch, side, every, sample_steps, text_encoder, rank,
                                  init_word, vectors, instance, klass, prior, n_class], outputs=[job_id, status])
    cancel.click(do_cancel, inputs=[job_id])
    timer.tick(poll, inputs=[job_id], outputs=[status, curve, samples], show_progress="hidden")
    return {"kind": kind, "dataset": dataset, "name": name, "start": start, "status": status, "curve": curve,
            "samples": samples, "job_id": job_id, "upload": upload}
