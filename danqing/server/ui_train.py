"""The Train tab of the web UI: a LoRA trained on a dataset folder of ``HOME/datasets/`` through
the server's training jobs (``server/train.py``), with its live loss curve and sample grids
(polled every second while the tab is open)."""

from __future__ import annotations

from PIL import Image

from danqing.errors import DanqingError
from danqing.server.common import JobFailed
from danqing.server.train import TrainJobSubmit
from danqing.server.ui_i18n import t


def loss_frame(job: dict | None):
    """The loss curve of a job view (``TrainJob.view``) as the LinePlot's table."""
    import pandas as pd  # gradio's own dependency

    points = [p for p in (job or {}).get("losses", []) if p["loss"] is not None]
    return pd.DataFrame({"step": [p["step"] for p in points], "loss": [p["loss"] for p in points]})


def status_line(job: dict | None) -> str:
    if not job:
        return ""
    loss = f", loss {job['loss']:.4f}" if job.get("loss") is not None else ""
    line = f"**{job['status']}** {job['name']}: step {job['step']}/{job['total']}{loss}"
    if job.get("error"):
        line += f"\n\n{job['error']}"
    if job["status"] == "done":
        line += f"\n\n`<lora:{job['name']}:1>`"
    return line


def train_tab(gr, state) -> dict:
    """Dataset, name and settings; Start / Cancel; status, loss curve and samples of the job."""
    queue = state.train
    with gr.Row():
        with gr.Column():
            with gr.Row():
                dataset = gr.Dropdown(queue.datasets(), label=t("Dataset (a folder of HOME/datasets/)"),
                                      elem_id="train_dataset", allow_custom_value=False)
                refresh = gr.Button(t("Refresh"), scale=0, elem_id="train_refresh")
            name = gr.Textbox(label=t("LoRA name"), elem_id="train_name")
            with gr.Row():
                steps = gr.Number(200, label=t("Steps"), precision=0, minimum=1, elem_id="train_steps")
                rank = gr.Number(8, label=t("Rank"), precision=0, minimum=1, elem_id="train_rank")
                lr = gr.Number(1e-3, label=t("Learning rate"), elem_id="train_lr")
            with gr.Row():
                batch = gr.Number(2, label=t("Batch size"), precision=0, minimum=1, elem_id="train_batch")
                side = gr.Number(64, label=t("Resolution"), precision=0, minimum=16, elem_id="train_resolution")
                every = gr.Number(50, label=t("Sample every N steps"), precision=0, minimum=1, elem_id="train_every")
            with gr.Row():
                start = gr.Button(t("Start training"), variant="primary", elem_id="train_start")
                cancel = gr.Button(t("Cancel"), variant="stop", elem_id="train_cancel")
        with gr.Column():
            status = gr.Markdown("", elem_id="train_status")
            curve = gr.LinePlot(loss_frame(None), x="step", y="loss", label=t("Loss"), elem_id="train_loss")
            samples = gr.Gallery(label=t("Samples"), columns=2, elem_id="train_samples", elem_classes=["dq-gallery"])
    job_id = gr.State(None)
    timer = gr.Timer(1.0, active=True)

    def do_start(ds, nm, n, r, rate, b, s, e):
        try:
            body = TrainJobSubmit(dataset=ds or "", name=nm or "", steps=int(n), rank=int(r), lr=float(rate),
                                  batch_size=int(b), resolution=int(s), sample_every=int(e))
            job = queue.submit(queue.prepare(body))
        except (DanqingError, ValueError) as exc:
            raise gr.Error(str(exc).splitlines()[0]) from None
        return job.id, status_line(job.view())

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

    refresh.click(lambda: gr.update(choices=queue.datasets()), outputs=[dataset])
    start.click(do_start, inputs=[dataset, name, steps, rank, lr, batch, side, every], outputs=[job_id, status])
    cancel.click(do_cancel, inputs=[job_id])
    timer.tick(poll, inputs=[job_id], outputs=[status, curve, samples], show_progress="hidden")
    return {"dataset": dataset, "name": name, "start": start, "status": status, "curve": curve, "samples": samples,
            "job_id": job_id}
