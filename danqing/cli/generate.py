"""``danqing generate`` (txt2img, hires fix, refiner, IP-Adapter, ControlNet, ``--from``) and
``danqing info``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from danqing.cli.unclip import family_generate
from danqing.cli.common import (OUT_HELP, app, control_units, dated_pictures, out_target, pictures_of, run_generate,
                                 with_native_size)
from danqing.errors import InvalidRequest
from danqing.models.fastpath import FAST_HELP, fast_path_from


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Argument(None, help="Prompt in A1111 syntax: attention (word:1.2), prompt editing [a:b:N] (a until step N, then b), alternation [a|b], BREAK."),
    negative: str = typer.Option("", "--negative", "-n", help="Negative prompt [default: none]."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (1-150) [default: 20]."),
    sampler: Optional[str] = typer.Option(None, help="A1111 sampler name [default: DPM++ 2M]; see `danqing samplers`."),
    schedule: Optional[str] = typer.Option(None, help="Schedule type [default: Automatic]: Karras, Exponential, ..."),
    cfg: Optional[float] = typer.Option(None, help="CFG scale (1-30) [default: 7]."),
    seed: Optional[int] = typer.Option(None, help="Seed; -1 = random [default: -1]."),
    subseed: Optional[int] = typer.Option(None, help="Variation seed; -1 = random [default: -1]."),
    subseed_strength: Optional[float] = typer.Option(None, help="Variation strength 0-1 [default: 0]."),
    width: Optional[int] = typer.Option(None, help="Width, multiple of 8 [default: the model's own size: 64 for danqing-tiny, 512 for SD1]."),
    height: Optional[int] = typer.Option(None, help="Height, multiple of 8 [default: the model's own size]."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch [default: 1]."),
    batch_count: Optional[int] = typer.Option(None, help="Number of batches [default: 1]."),
    model: Optional[str] = typer.Option(None, help="Checkpoint name, hash or path [default: settings' default model]."),
    vae: Optional[str] = typer.Option(None, help="VAE name or path overriding the checkpoint's (an SD3 / FLUX file without one: its VAE, e.g. ae.safetensors) [default: the checkpoint's own]."),
    text_encoder: Optional[list[str]] = typer.Option(None, "--text-encoder", help="SD3 / FLUX file without its text encoders: an encoder file (clip_l, clip_g, t5xxl; a name in models/text_encoder/ or a path), repeatable [default: none]."),
    clip_skip: Optional[int] = typer.Option(None, help="CLIP skip (1 = last layer, 2 = penultimate) [default: 1]."),
    distilled_cfg: Optional[float] = typer.Option(None, help="FLUX.1 dev: Distilled CFG Scale, its guidance embedding [default: 3.5]."),
    shift: Optional[float] = typer.Option(None, help="SD3 / FLUX: a static timestep shift [default: the model's]."),
    from_image: Optional[Path] = typer.Option(None, "--from", help="Re-create an image from its PNG metadata (options given here override) [default: none]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help=OUT_HELP.format("outputs/txt2img-images/DATE/") + " Or an fsspec URL folder (s3://bucket/renders/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    hires: Optional[bool] = typer.Option(None, "--hires/--no-hires", help="Hires fix: a second pass at a larger size."),
    hr_scale: Optional[float] = typer.Option(None, help="Hires fix: upscale factor (1-8) [default: 2]."),
    hr_resize_x: Optional[int] = typer.Option(None, help="Hires fix: target width instead of --hr-scale [default: 0 = use --hr-scale]."),
    hr_resize_y: Optional[int] = typer.Option(None, help="Hires fix: target height instead of --hr-scale [default: 0 = use --hr-scale]."),
    hr_upscaler: Optional[str] = typer.Option(None, help="Hires fix: Latent, Latent (antialiased), Latent (bicubic), Latent (nearest), Latent (nearest-exact), Lanczos, Nearest or an installed model upscaler [default: Latent]."),
    hr_steps: Optional[int] = typer.Option(None, help="Hires fix: second-pass steps (0 = --steps) [default: 0]."),
    hr_sampler: Optional[str] = typer.Option(None, help="Hires fix: second-pass sampler [default: --sampler]."),
    hr_prompt: Optional[str] = typer.Option(None, help="Hires fix: second-pass prompt [default: the prompt]."),
    hr_negative: Optional[str] = typer.Option(None, help="Hires fix: second-pass negative prompt [default: the negative prompt]."),
    denoise: Optional[float] = typer.Option(None, help="Hires fix: second-pass denoising strength 0-1 [default: 0.75]."),
    refiner: Optional[str] = typer.Option(None, help="Refiner checkpoint (an SDXL refiner) that finishes the picture [default: none]."),
    refiner_switch_at: Optional[float] = typer.Option(None, help="Refiner: fraction of the schedule done by the base model [default: 0.8]."),
    ip_adapter: Optional[list[str]] = typer.Option(None, "--ip-adapter", help="Image prompt: IMAGE[:WEIGHT] (weight 0-2, default 1); repeat for several pictures [default: none]."),
    ip_adapter_model: Optional[str] = typer.Option(None, help="IP-Adapter file in models/ipadapter/ [default: the only one]."),
    ip_adapter_encoder: Optional[str] = typer.Option(None, help="CLIP vision encoder folder in models/clip_vision/ [default: the only one]."),
    control: list[str] = typer.Option([], "--control", help="ControlNet unit TYPE:IMAGE[:WEIGHT] (repeatable); TYPE is canny, lineart, ... or a ControlNet name; IMAGE a control map [default: none]."),
    control_preprocess: bool = typer.Option(False, "--control-preprocess", help="Run each --control type's preprocessor on its IMAGE first (IMAGE is then a photo)."),
    style: list[str] = typer.Option([], "--style", help="A style of HOME/styles.csv (A1111's format), applied to the prompts; repeatable (see `danqing styles`) [default: none]."),
    dynamic: bool = typer.Option(True, "--dynamic/--no-dynamic", help="Draw wildcards (__name__ from HOME/wildcards/) and {a|b} variants from the seed [default: on]."),
    regions: Optional[str] = typer.Option(None, "--regions", metavar="RATIOS", help="Regional prompting: Regional Prompter's Divide Ratio (1,1 = two columns; 1,2,1;2,1,1 = rows of columns); the prompt's BREAK parts are the regions' prompts (ADDBASE / ADDCOMM for a base / common prompt) [default: none]."),
    region_mode: Optional[str] = typer.Option(None, help="Regional prompting: Columns, Rows or Mask [default: Columns]."),
    region_mask: Optional[list[str]] = typer.Option(None, "--region-mask", help="Regional prompting, Mask mode: one mask picture per region, white = the region (repeat) [default: none]."),
    base_ratio: Optional[str] = typer.Option(None, help="Regional prompting: the base prompt's share in each region, 0-1 (one, or one per region) [default: 0.2]."),
    deepcache: Optional[int] = typer.Option(None, help="DeepCache: run the whole UNet every N model evaluations, the shallow branch between (0 = off; 2 is the usual strength at 20 steps; changes the picture a little) [default: 0]."),
    tome: Optional[float] = typer.Option(None, help="ToMe token merging: fraction of tokens merged, 0-0.75 (0 = off; 0.5 is the usual strength; changes the picture a little) [default: 0]."),
    fast: list[str] = typer.Option([], "--fast", help=FAST_HELP + "."),
    prior: Optional[str] = typer.Option(None, help="Kandinsky 2.2 (--model its decoder folder): the prior folder [default: none]."),
    prior_steps: Optional[int] = typer.Option(None, help="Kandinsky 2.2: prior steps [default: 25]."),
    prior_cfg: Optional[float] = typer.Option(None, help="Kandinsky 2.2: prior CFG scale [default: 4]."),
    stage2: Optional[str] = typer.Option(None, "--stage2", help="DeepFloyd IF (--model its stage-I folder): the stage-II folder, 4x the size [default: none: stage I only]."),
    stage2_steps: Optional[int] = typer.Option(None, "--stage2-steps", help="DeepFloyd IF: stage-II steps [default: 50]."),
    stage2_cfg: Optional[float] = typer.Option(None, "--stage2-cfg", help="DeepFloyd IF: stage-II CFG scale [default: 4]."),
    noise_level: Optional[int] = typer.Option(None, help="DeepFloyd IF: noise added to the stage-I picture for stage II, 0-999 [default: 250]."),
    upscaler: Optional[str] = typer.Option(None, help="DeepFloyd IF: a last 4x upscale by this upscaler (Lanczos or an installed model) [default: none]."),
    medvram: bool = typer.Option(False, "--medvram", help="CUDA: move each model to the GPU only while it runs (model CPU offload) [default: off]."),
    lowvram: bool = typer.Option(False, "--lowvram", help="CUDA: stream each layer to the GPU when it runs (sequential CPU offload; slowest, least memory) [default: off]."),
    offload: Optional[str] = typer.Option(None, help="CUDA: model (each model on the GPU only while it runs; = --medvram) or sequential (each layer streamed to the GPU; = --lowvram): SD3 / FLUX within less VRAM (docs/models.md) [default: none]."),
):
    """Generate images from a prompt (txt2img, optionally with hires fix) and save them as PNGs
    with A1111 metadata; `--from IMAGE` re-creates any danqing image (img2img and inpaint too)."""
    from danqing.request import GenerationRequest  # lazy: imports torch

    fields = {
        "prompt": prompt, "steps": steps, "sampler": sampler, "schedule": schedule, "cfg_scale": cfg,
        "seed": seed, "subseed": subseed, "subseed_strength": subseed_strength, "width": width,
        "height": height, "batch_size": batch_size, "batch_count": batch_count, "model": model, "vae": vae,
        "clip_skip": clip_skip, "distilled_cfg_scale": distilled_cfg, "shift": shift, "text_encoders": tuple(text_encoder) if text_encoder else None, "enable_hr": hires, "hr_scale": hr_scale, "hr_resize_x": hr_resize_x,
        "hr_resize_y": hr_resize_y, "hr_upscaler": hr_upscaler, "hr_second_pass_steps": hr_steps,
        "hr_sampler_name": hr_sampler, "hr_prompt": hr_prompt, "hr_negative_prompt": hr_negative,
        "denoising_strength": denoise, "refiner_checkpoint": refiner, "refiner_switch_at": refiner_switch_at,
        "deepcache_interval": deepcache, "tome_ratio": tome,
    }
    if ip_adapter:
        fields.update(parse_ip_adapter_option(ip_adapter))
    fields.update(ip_adapter=ip_adapter_model, ip_adapter_encoder=ip_adapter_encoder)
    fields = {k: v for k, v in fields.items() if v is not None}
    if negative:
        fields["negative_prompt"] = negative
    source_infotext = None
    if control:
        fields["controlnet"] = control_units(control, control_preprocess)
    region_options = {"ratios": regions, "mode": region_mode or ("Mask" if region_mask else None),
                      "masks": tuple(region_mask) if region_mask else None, "base_ratios": base_ratio}
    region_options = {k: v for k, v in region_options.items() if v is not None}
    if from_image is not None:
        from danqing.outputs.metadata import request_from_infotext
        from danqing.outputs.store import read_infotext

        source_infotext = read_infotext(from_image)
        request = request_from_infotext(source_infotext)
        if region_options:  # the image's regions, with these options changed
            fields["regions"] = {**(request.regions.model_dump() if request.regions else {}), **region_options}
        request = request.replace(**fields)
    else:
        if prompt is None:
            raise InvalidRequest("prompt", "give a prompt, or --from IMAGE to re-create an image")
        if region_options:
            fields["regions"] = region_options
        request = GenerationRequest.create(**with_native_size(ctx.obj, fields))
    extra = None
    if style or (dynamic and from_image is None):  # --from: the file's prompt is already drawn
        from danqing.apps.prompting import Prompting, expand_request

        request, extra = expand_request(request, Prompting.at(ctx.obj.home), style,
                                        dynamic=dynamic and from_image is None)
    options = dict(prior=prior, prior_steps=prior_steps, prior_cfg_scale=prior_cfg, stage_2=stage2, stage_2_steps=stage2_steps,
                   stage_2_cfg_scale=stage2_cfg, noise_level=noise_level, upscaler=upscaler)
    if family_generate(ctx.obj, request, out, options, source_infotext, size_given=bool(from_image or width or height)):
        return
    target = out_target(out, dated_pictures(ctx.obj, "txt2img-images"), url_ok=True)
    target.check_free(pictures_of(request))
    settings = ctx.obj.with_(fast=fast_path_from(fast, medvram=medvram, lowvram=lowvram, offload=offload))
    check_offload(settings)
    run_generate(settings, request, target, quiet, source_infotext=source_infotext, extra_params=extra or None)


def parse_ip_adapter_option(values: list[str]) -> dict:
    """``--ip-adapter IMAGE[:WEIGHT]`` (repeated) -> request fields; one weight for all pictures."""
    images, weights = [], set()
    for value in values:
        path, sep, weight = value.rpartition(":")
        if sep and path and weight:
            try:
                weights.add(float(weight))
            except ValueError:  # a ':' of the path itself
                path = value
        else:
            path = value
        images.append(path)
    if len(weights) > 1:
        raise InvalidRequest("ip_adapter_weight", f"the pictures of one IP-Adapter share one weight; got "
                             f"{', '.join(f'{w:g}' for w in sorted(weights))}")
    fields: dict = {"ip_adapter_image": tuple(images)}
    if weights:
        fields["ip_adapter_weight"] = weights.pop()
    return fields


@app.command()
def info(image: Path = typer.Argument(..., help="A PNG (or JPEG/WebP) written by danqing or A1111, a video or a 3D run's file by danqing.")):
    """Print an image's generation parameters (A1111 infotext), a video's (JSON), or a 3D run's (a mesh or its NAME.json)."""
    from danqing.outputs.store import read_infotext
    from danqing.outputs.video import is_video, read_video_parameters

    if is_video(image):
        return print(read_video_parameters(image))
    if image.suffix.lower() in (".glb", ".obj", ".ply", ".json"):  # danqing 3d's files
        from danqing.threed.export import read_params

        return print(read_params(image))
    print(read_infotext(image))


def check_offload(settings) -> None:
    """``--offload`` / ``--medvram`` / ``--lowvram`` on a machine without CUDA: one line before any
    model is loaded."""
    if settings.fast.offload != "none":
        from danqing.models.fastpath import check_device  # lazy: imports torch
        from danqing.models.manager import pick_device

        check_device(settings.fast, pick_device(settings.device))
