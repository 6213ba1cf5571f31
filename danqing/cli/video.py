"""``danqing video``: text-to-video with an AnimateDiff motion module (docs/video.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import app, control_units, dated, make_studio, with_native_size

VIDEO_OUT_HELP = ("Output file: NAME.mp4 (H.264), NAME.gif, NAME.webp (animated) or NAME.png (frames NAME-000.png, "
                  "...), each with NAME.EXT.json beside it; a folder (ending with /) gets a numbered NAME.mp4; "
                  "[default: outputs/txt2video/DATE/]")


@app.command()
def video(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Argument(None, help="Prompt in A1111 syntax, the same for every frame; lines 'FRAME: text' make it travel from keyframe to keyframe (docs/video.md)."),
    travel: bool = typer.Option(False, "--travel", help="The shapes world: rewrite a straight motion ('a red circle moving to the right', '一个红色的圆形向右移动') as prompt travel between the still world's positions [default: off]."),
    negative: Optional[str] = typer.Option(None, "--negative", "-n", help="Negative prompt [default: none]."),
    frames: Optional[int] = typer.Option(None, help="Frames of the clip (1-128; longer than the motion module's window: sliding context windows) [default: 16]."),
    context_overlap: Optional[int] = typer.Option(None, help="Frames shared by neighbouring context windows of a long clip [default: 4]."),
    fps: Optional[int] = typer.Option(None, help="Frames per second of the file (1-60) [default: 8]."),
    motion: Optional[str] = typer.Option(None, "--motion", help="Motion module name in models/motion/ [default: the only one]."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (1-150) [default: 20]."),
    sampler: Optional[str] = typer.Option(None, help="A1111 sampler name [default: DPM++ 2M]."),
    schedule: Optional[str] = typer.Option(None, help="Schedule type [default: Automatic]."),
    cfg: Optional[float] = typer.Option(None, help="CFG scale (1-30) [default: 7]."),
    seed: Optional[int] = typer.Option(None, help="Seed; -1 = random [default: -1]."),
    width: Optional[int] = typer.Option(None, help="Width, multiple of 8 [default: the clip's, else the model's own size]."),
    height: Optional[int] = typer.Option(None, help="Height, multiple of 8 [default: the clip's, else the model's own size]."),
    batch_size: Optional[int] = typer.Option(None, help="Clips per batch (clip i has seed + i) [default: 1]."),
    model: Optional[str] = typer.Option(None, help="Checkpoint name, hash or path [default: settings' default model]."),
    init: Optional[Path] = typer.Option(None, "--init", help="Video-to-video: restyle this clip (MP4, GIF, WebP); its frame count, fps and size are kept unless given [default: none]."),
    denoise: Optional[float] = typer.Option(None, "--denoise", help="Video-to-video: how far each frame is noised before denoising (0-1) [default: 0.75]."),
    per_frame: bool = typer.Option(False, "--per-frame", help="No motion module: each frame denoised as its own picture by the checkpoint (per-frame img2img with --init) [default: off, the frames together]."),
    cross_frame: Optional[bool] = typer.Option(None, "--cross-frame/--no-cross-frame", help="Self-attention also to the first and previous frames [default: off]."),
    shared_noise: Optional[bool] = typer.Option(None, "--shared-noise/--no-shared-noise", help="Every frame starts from frame 0's noise [default: off]."),
    flow_blend: Optional[float] = typer.Option(None, "--flow-blend", help="Video-to-video: blend each frame with the previous one warped along the clip's optical flow (0-1) [default: 0, off]."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="Image-to-video with a Stable Video Diffusion model (--model): the clip starts from this picture; no prompt [default: none]."),
    motion_bucket: Optional[int] = typer.Option(None, "--motion-bucket", help="SVD: how much motion (0-1023) [default: 127]."),
    noise_aug: Optional[float] = typer.Option(None, "--noise-aug", help="SVD: noise added to the picture's conditioning (0-1) [default: 0.02]."),
    min_cfg: Optional[float] = typer.Option(None, "--min-cfg", help="SVD: the first frame's CFG scale; --cfg is the last's [default: 1]."),
    control: list[str] = typer.Option([], "--control", help="ControlNet unit TYPE:IMAGE[:WEIGHT] (repeatable): IMAGE a map for every frame, or a clip (MP4, GIF, WebP) whose frames are the frames' maps [default: none]."),
    control_preprocess: bool = typer.Option(False, "--control-preprocess", help="Run each --control type's preprocessor on its picture or on every frame of its clip first."),
    from_video: Optional[Path] = typer.Option(None, "--from", help="Re-create a clip from a video danqing wrote (options given here override) [default: none]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help=VIDEO_OUT_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Generate a video clip from a prompt with an AnimateDiff motion module on a checkpoint, or
    restyle a clip (--init) frame by frame with temporal consistency."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from danqing.errors import InvalidRequest
    from danqing.outputs.video import check_video_out, read_video_parameters
    from danqing.request_video import VideoRequest
    from danqing.video.studio import VideoStudio, request_from_parameters, video2video_fields

    fields = {"prompt": prompt, "negative_prompt": negative, "frames": frames, "fps": fps, "motion_module": motion,
              "context_overlap": context_overlap,
              "steps": steps, "sampler": sampler, "schedule": schedule, "cfg_scale": cfg, "seed": seed,
              "width": width, "height": height, "batch_size": batch_size, "model": model,
              "denoising_strength": denoise, "motion": False if per_frame else None, "cross_frame_attention": cross_frame,
              "shared_noise": shared_noise, "flow_blend": flow_blend,
              "init_image": str(init_image) if init_image is not None else None, "motion_bucket_id": motion_bucket,
              "noise_aug_strength": noise_aug, "min_cfg_scale": min_cfg}
    fields = {k: v for k, v in fields.items() if v is not None}
    if control:
        fields["controlnet"] = control_units(control, control_preprocess)
    if init is not None:  # the clip's frame count, fps and size unless given
        fields = video2video_fields(fields, init)
    if from_video is not None:
        request = request_from_parameters(read_video_parameters(from_video)).replace(**fields)
    elif prompt is None and init_image is None:
        raise InvalidRequest("prompt", "give a prompt, or --from VIDEO to re-create a clip")
    else:
        request = VideoRequest.create(**(fields if init is not None else with_native_size(ctx.obj, fields)))
    if travel:
        from danqing.synthetic.motion import travel_prompt

        text = travel_prompt(request.prompt, request.frames)
        if text is None:
            raise InvalidRequest("prompt", f"--travel rewrites a straight motion of the shapes world ('a red circle "
                                           f"moving to the right', '一个红色的圆形向右移动'); {request.prompt!r} names none")
        request = request.replace(prompt=text)
    target = video_target(out, dated(ctx.obj, "txt2video"))
    check_video_out(target)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task("sampling", total=request.steps * request.batch_count)
        result = VideoStudio(make_studio(ctx.obj)).generate(
            request, on_step=lambda info: progress.update(task, completed=info.batch_index * info.total + info.step),
            out=target)
    for path in result.paths:
        print(path)
    console.print(f"{len(result.clips)} clip(s) of {result.request.frames} frames in {result.timings['total']:.2f}s "
                  f"(seed {result.seeds[0]})")


def video_target(out: Optional[str], default_folder: Path) -> Path:
    """``--out`` as a file: NAME.EXT as given; a folder (or no ``--out``): its next free NNNNN.mp4."""
    if out is not None and not (out.endswith(("/", os.sep)) or Path(out).is_dir()):
        return Path(out)
    folder = Path(out) if out is not None else default_folder
    taken = {p.stem for p in folder.glob("*")} if folder.is_dir() else set()
    n = len(taken)
    while f"{n:05d}" in taken:
        n += 1
    return folder / f"{n:05d}.mp4"
