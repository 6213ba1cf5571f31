"""What the web UI's tabs share: running a job through the queue while showing its progress,
the request fields each tab sends, and turning UI values into request fields."""

import io
import re
from typing import Any

from PIL import Image

from danqing.errors import DanqingError
from danqing.files import is_url
from danqing.outputs import place
from danqing.server.gradio_import import gradio
from danqing.server.store import TERMINAL

# The request fields of the txt2img / img2img controls, in the order the handlers receive them.
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


def status_line(state, job) -> str:
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
        yield gallery, gr.skip(), status_line(state, job)
    if job.status != "done":
        raise gr.Error(job.error or f"job {job.status}")
    images = job.result["images"]
    gallery = [(shown_file(state, i["path"]), f"seed {i['seed']}") for i in images]
    secs = job.result["timings"].get("total", 0)
    note = " (interrupted)" if job.result.get("interrupted") else ""
    yield gallery, images[0]["infotext"] if images else "", f"done{note}: {len(images)} image(s) in {secs:.2f}s"


def shown_file(state, location) -> str:
    """A saved picture as a local file the UI can show: itself, or for pictures under an fsspec
    outputs URL a copy in ``outputs/.url-cache/`` (same bytes, so the infotext reads back)."""
    if not location or not is_url(location):
        return location
    return str(place.local_copy(location, state.settings.outputs_dir / ".url-cache"))


def item_path(item) -> str | None:
    """A gallery item as Gradio hands it to a function: (path, caption), a dict or a path."""
    if item is None:
        return None
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):
        item = (item.get("image") or {}).get("path") or item.get("path")
    return str(item) if item else None


def clean(fields: dict) -> dict:
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
