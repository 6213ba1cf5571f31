"""docs/images/motion.gif: the bundled danqing-tiny with a motion module trained by
``danqing train motion`` (installed in HOME/models/motion/, its cross-attention LoRA in
HOME/models/lora/), four held-out prompts (a colour-shape-motion combination the module never
trained on; one per direction), 16 frames at 64x64, 20 steps DPM++ 2M, CFG 7, seeds 6000+; each
clip shown 2x, the four side by side, 8 fps.

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/motion_figure.py HOME MOTION [LORA] [OUT] [--travel] [--vae=NAME] [--per-frame]

``--travel``: each prompt rewritten as prompt travel (``synthetic.motion.travel_prompt``);
``--vae=NAME``: a VAE overriding danqing-tiny's (docs/images/motion-travel.gif: the bundled
module, no LoRA, ``--travel --vae=danqing-tiny-vae-ft --per-frame``); ``--per-frame``: a second
row of the same prompts and seeds drawn frame by frame with no motion module.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from PIL import Image

    from danqing import Settings, Studio
    from danqing.request_video import VideoRequest
    from danqing.synthetic.motion import DIRECTIONS, heldout_clips, motion_caption, travel_prompt
    from danqing.video.studio import VideoStudio

    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    travel, per_frame = "--travel" in flags, "--per-frame" in flags
    vae = next((f.split("=", 1)[1] for f in flags if f.startswith("--vae=")), None)
    home, motion = args[0], args[1]
    lora = f" <lora:{args[2]}:1>" if len(args) > 2 and args[2] else ""
    out = args[3] if len(args) > 3 else "docs/images/motion.gif"
    videos = VideoStudio(Studio(Settings(home=home, device="cpu", dtype="fp32")))
    clips = heldout_clips(len(DIRECTIONS))  # the directions in turn: right, left, up, down
    rows = []
    for module in ([True, False] if per_frame else [True]):
        row = []
        for i, clip in enumerate(clips):
            prompt = travel_prompt(motion_caption(clip, "en")) if travel else motion_caption(clip, "en")
            request = VideoRequest(prompt=prompt + lora, frames=16, fps=8, width=64, height=64, steps=20,
                                   seed=6000 + i, sampler="DPM++ 2M", cfg_scale=7.0, model="danqing-tiny",
                                   motion_module=motion if module else None, motion=module, vae=vae)
            row.append(videos.generate(request).clips[0])
            print(request.prompt)
        rows.append(row)
    scale, gap = 2, 4
    side = 64 * scale
    frames = []
    for f in range(16):
        sheet = Image.new("RGB", (len(clips) * side + (len(clips) - 1) * gap, len(rows) * side + (len(rows) - 1) * gap),
                          "white")
        for r, row in enumerate(rows):
            for k, clip in enumerate(row):
                sheet.paste(clip[f].resize((side, side), Image.NEAREST), (k * (side + gap), r * (side + gap)))
        frames.append(sheet)
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=125, loop=0, optimize=True)
    print(out)


if __name__ == "__main__":
    main()
