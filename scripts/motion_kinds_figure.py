"""docs/images/motion-kinds.gif: the moving shapes world's five kinds of clip as rendered
(training data, not generated): a straight line, an arc, a growing, a shrinking and a
recolouring object, one held-out combination of each, 16 frames at 64x64 shown 2x side by side,
8 fps, captions in the docs.

    PYTHONPATH=. python scripts/motion_kinds_figure.py [OUT]
"""

from __future__ import annotations

import sys


def main() -> None:
    from PIL import Image

    from danqing.synthetic.motion import heldout_clips, heldout_kind_clips, motion_caption
    from danqing.synthetic.render import render

    out = sys.argv[1] if len(sys.argv) > 1 else "docs/images/motion-kinds.gif"
    clips = heldout_clips(1) + [heldout_kind_clips(1, k)[0] for k in ("arc", "grow", "shrink", "recolour")]
    for c in clips:
        print(motion_caption(c), "/", motion_caption(c, "zh"))
    frames = []
    for i in range(clips[0].frames):
        sheet = Image.new("RGB", (128 * len(clips) + 4 * (len(clips) - 1), 128), (255, 255, 255))
        for j, c in enumerate(clips):
            sheet.paste(render(c.scene_at(i)).resize((128, 128), Image.NEAREST), (j * 132, 0))
        frames.append(sheet)
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=125, loop=0)


if __name__ == "__main__":
    main()
