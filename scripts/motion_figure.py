"""docs/images/motion.gif: the bundled danqing-tiny with a motion module trained by
``danqing train motion`` (installed in HOME/models/motion/, its cross-attention LoRA in
HOME/models/lora/), four held-out prompts (a colour-shape-motion combination the module never
trained on; one per direction), 16 frames at 64x64, 20 steps DPM++ 2M, CFG 7, seeds 6000+; each
clip shown 2x, the four side by side, 8 fps.

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/motion_figure.py HOME MOTION [LORA] [OUT]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from PIL import Image

    from danqing import Settings, Studio
    from danqing.request_video import VideoRequest
    from danqing.synthetic.motion import DIRECTIONS, heldout_clips, motion_caption
    from danqing.video.studio import VideoStudio

    home, motion = sys.argv[1], sys.argv[2]
    lora = f" <lora:{sys.argv[3]}:1>" if len(sys.argv) > 3 and sys.argv[3] else ""
    out = sys.argv[4] if len(sys.argv) > 4 else "docs/images/motion.gif"
    videos = VideoStudio(Studio(Settings(home=home, device="cpu", dtype="fp32")))
    clips = heldout_clips(len(DIRECTIONS))  # the directions in turn: right, left, up, down
    rows = []
    for i, clip in enumerate(clips):
        request = VideoRequest(prompt=motion_caption(clip, "en") + lora, frames=16, fps=8, width=64, height=64, steps=20,
                               seed=6000 + i, sampler="DPM++ 2M", cfg_scale=7.0, model="danqing-tiny",
                               motion_module=motion)
        rows.append(videos.generate(request).clips[0])
        print(request.prompt)
    scale, gap = 2, 4
    side = 64 * scale
    frames = []
    for f in range(16):
        sheet = Image.new("RGB", (len(rows) * side + (len(rows) - 1) * gap, side), "white")
        for k, clip in enumerate(rows):
            sheet.paste(clip[f].resize((side, side), Image.NEAREST), (k * (side + gap), 0))
        frames.append(sheet)
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=125, loop=0, optimize=True)
    print(out)


if __name__ == "__main__":
    main()
