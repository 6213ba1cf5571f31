"""The web UI's media tabs: "3D" (text-to-3D, a ``Model3D`` viewer of the GLB and the turntable),
"Video" (text-to-video and video-to-video, a player) and "Talk" (a talking portrait). Each builds the same request as the job
API (``server/threed.py``, ``server/video.py``, ``server/talk.py``), queues it and shows what the worker reports:
step, loss (3D), the latest preview, then the job's files.
"""

# No ``from __future__ import annotations``: Gradio reads the handlers' annotations at run time.
import io
from pathlib import Path

from PIL import Image

from danqing.errors import DanqingError
from danqing.server.gradio_import import gradio
from danqing.server.store import TERMINAL
from danqing.server.talk import prepare_talk
from danqing.server.threed import prepare_3d_job
from danqing.models.native import native_side
from danqing.server.ui_i18n import t
from danqing.server.ui_generate import controlnet_controls, with_controlnet
from danqing.server.video import prepare_video


def follow(state, make_request):
    """Queue ``make_request()`` and yield (preview picture or ``gr.skip()``, status line) until
    the job ends; the finished job is the generator's return value."""
    gr = gradio()
    try:
        job = state.worker.submit(make_request(), source="ui", save=True)
    except DanqingError as exc:
        raise gr.Error(str(exc)) from None
    shown = None
    while job.status not in TERMINAL:
        job = state.worker.wait(job.id, timeout=0.25)
        p = state.worker.progress(job.id)
        if job.status == "queued":
            yield gr.skip(), f"queued ({state.store.position(job)} ahead)"
            continue
        if p["job_id"] != job.id:
            continue
        line = f"step {p['step']}/{p['total']}" + (f", loss {p['loss']:.4g}" if p.get("loss") is not None else "")
        fresh = p["preview_png"] is not None and p["preview_step"] != shown
        shown = p["preview_step"] if fresh else shown
        yield (Image.open(io.BytesIO(p["preview_png"])) if fresh else gr.skip()), line
    if job.status != "done":
        raise gr.Error(job.error or f"job {job.status}")
    return job


def files_of(job, key: str) -> dict[str, str]:
    """{extension: path} of a finished job's files (``files`` of 3D, ``videos`` of video)."""
    return {Path(f["path"]).suffix.lstrip("."): f["path"] for f in job.result.get(key, [])}


def threed_tab(gr, state):
    """Prompt, steps, size and seed -> a 3D job; the front view while it runs, then the mesh in a
    ``Model3D`` viewer, the turntable and the files (GLB, OBJ, PLY, JSON)."""
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label=t("Prompt"), lines=2, placeholder="a red ball")
            negative = gr.Textbox(label=t("Negative prompt"), lines=1)
            steps = gr.Slider(1, 5000, value=400, step=1, label=t("Optimisation steps"))
            size = gr.Slider(32, 512, value=64, step=8, label=t("Render size"))
            seed = gr.Number(value=0, precision=0, minimum=0, label=t("Seed"))
            go = gr.Button(t("Make 3D"), variant="primary")
        with gr.Column():
            preview = gr.Image(label=t("Front view"), type="pil", interactive=False)
            status = gr.Textbox(label=t("Status"), interactive=False)
            model = gr.Model3D(label=t("Mesh"), interactive=False)
            turntable = gr.Video(label=t("Turntable"), interactive=False)
            files = gr.File(label=t("Files"), file_count="multiple", interactive=False)

    def run(text, neg, n, px, s):
        fields = {"prompt": text or "", "negative_prompt": neg or "", "steps": int(n), "size": int(px),
                  "seed": int(s or 0)}
        job = yield from follow(state, lambda: prepare_3d_job(state, fields))
        out = files_of(job, "files")
        yield (gr.skip(), f"done: {len(job.result['losses'])} steps", out.get("glb"), out.get("mp4"),
               [out[k] for k in ("glb", "obj", "ply", "json") if k in out])

    def stream(*args):
        for item in run(*args):
            yield item if len(item) == 5 else (*item, gr.skip(), gr.skip(), gr.skip())

    go.click(stream, [prompt, negative, steps, size, seed], [preview, status, model, turntable, files])


def video_tab(gr, state):
    """Prompt, frames, fps, steps and seed -> a video job: text-to-video (a motion module), with a
    clip to restyle video-to-video, with a picture to animate image-to-video (a Stable Video
    Diffusion checkpoint), and a ControlNet unit whose map conditions every frame (or whose clip
    gives each frame its own map); the latest
    frame preview while it runs, then the clip in a player."""
    checkpoints = [e.name for e in state.registry.scan("checkpoint")]
    with gr.Row():
        with gr.Column():
            model = gr.Dropdown(checkpoints, value=None, label=t("Video checkpoint (empty = the checkpoint above; "
                                                                 "image-to-video: a Stable Video Diffusion one)"))
            prompt = gr.Textbox(label=t("Prompt"), lines=2, placeholder="a red circle moving to the right")
            negative = gr.Textbox(label=t("Negative prompt"), lines=1)
            motion = gr.Dropdown([e.name for e in state.registry.scan("motion")], value=None,
                                 label=t("Motion module"))
            with gr.Tab(t("Clip to restyle (video-to-video)")):
                clip = gr.Video(label=t("Clip to restyle (video-to-video)"), sources=["upload"])
                with gr.Row():
                    cross = gr.Checkbox(label=t("Cross-frame attention"))
                    shared = gr.Checkbox(label=t("Shared noise"))
                    blend = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label=t("Flow blending"))
            with gr.Tab(t("Picture to animate (image-to-video)")):
                picture = gr.Image(type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                   label=t("Picture to animate (a Stable Video Diffusion checkpoint; Euler)"))
                bucket = gr.Slider(1, 255, value=127, step=1, label=t("Motion bucket"))
            side = native_side(state.registry, state.options()["sd_model_checkpoint"])
            with gr.Row():
                width = gr.Slider(64, 2048, value=side, step=8, label=t("Width"))
                height = gr.Slider(64, 2048, value=side, step=8, label=t("Height"))
            with gr.Row():
                frames = gr.Slider(2, 64, value=16, step=1, label=t("Frames"))
                fps = gr.Slider(1, 60, value=8, step=1, label=t("Frames per second"))
            with gr.Row():
                steps = gr.Slider(1, 150, value=20, step=1, label=t("Sampling steps"))
                cfg = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label=t("CFG scale"))
                strength = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label=t("Denoising strength"))
            seed = gr.Number(value=-1, precision=0, label=t("Seed"))
            unit = controlnet_controls(gr, state, "video", clip=True)
            go = gr.Button(t("Make video"), variant="primary")
        with gr.Column():
            preview = gr.Image(label=t("Preview"), type="pil", interactive=False)
            status = gr.Textbox(label=t("Status"), interactive=False)
            player = gr.Video(label=t("Video"), interactive=False, autoplay=True)

    def run(ckpt, text, neg, mm, upload, x, sh, b, still, mb, w, h, n, rate, k, scale, d, s, *control):
        fields = {"prompt": text or "", "negative_prompt": neg or "", "steps": int(k), "seed": int(s),
                  "cfg_scale": float(scale)}
        if ckpt:
            fields["model"] = ckpt
        if mm:
            fields["motion_module"] = mm
        data = None
        if upload:
            fields.update(denoising_strength=float(d), cross_frame_attention=bool(x), shared_noise=bool(sh),
                          flow_blend=float(b))
            data = Path(upload).read_bytes()
        else:
            fields.update(frames=int(n), fps=int(rate), width=int(w), height=int(h))
        if still is not None:  # image-to-video: SVD's own Euler schedule, the picture the only condition
            fields.update(sampler="Euler", motion_bucket_id=int(mb))
        job = yield from follow(state, lambda: prepare_video(state, with_controlnet(fields, control), data, still))
        out = files_of(job, "videos")
        yield gr.skip(), f"done: {len(out)} clip(s)", next(iter(out.values()), None)

    def stream(*args):
        for item in run(*args):
            yield item if len(item) == 3 else (*item, gr.skip())

    go.click(stream, [model, prompt, negative, motion, clip, cross, shared, blend, picture, bucket, width, height,
                      frames, fps, steps, cfg, strength, seed, *unit], [preview, status, player])


def talk_tab(gr, state):
    """A photo and a line of text (or a sound file) -> a talking-portrait job; the MP4 with its
    sound in a player (``danqing app talk``)."""
    with gr.Row():
        with gr.Column():
            picture = gr.Image(label=t("Portrait photo"), type="filepath", sources=["upload"])
            text = gr.Textbox(label=t("Text to speak"), lines=2, placeholder="你好，我是丹青")
            voice = gr.Dropdown(["en", "zh"], value="en", label=t("Voice"))
            audio = gr.Audio(label=t("Or a sound file (instead of text)"), type="filepath", sources=["upload"])
            with gr.Row():
                fps = gr.Slider(1, 60, value=25, step=1, label=t("Frames per second"))
                strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label=t("Mouth strength"))
            go = gr.Button(t("Make talking portrait"), variant="primary")
        with gr.Column():
            status = gr.Textbox(label=t("Status"), interactive=False)
            player = gr.Video(label=t("Video"), interactive=False, autoplay=True)

    def stream(photo, line, v, sound, rate, k):
        if not photo:
            raise gr.Error("picture: drop a portrait photo")
        fields = {"text": None if sound else (line or None), "voice": v, "fps": int(rate), "strength": float(k)}
        data = Path(sound).read_bytes() if sound else None
        steps = follow(state, lambda: prepare_talk(state, fields, Path(photo).read_bytes(), data))
        while True:
            try:
                _, line_ = next(steps)
            except StopIteration as end:
                job = end.value
                break
            yield line_, gr.skip()
        out = files_of(job, "files")
        yield f"done: {job.result['frames']} frames", out.get("mp4")

    go.click(stream, [picture, text, voice, audio, fps, strength], [status, player])
