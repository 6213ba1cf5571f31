"""docs/images/p2p.png: Prompt-to-Prompt and null-text inversion on the bundled model.

Left (6 seeds): the source picture, its word-swap edit (red -> green), and plain regeneration of
the edited prompt at the same seed. Right (3 rendered, i.e. real, pictures): the picture, its
null-text reconstruction and the edit.

    .venv/bin/python scripts/figure_p2p.py
"""

from __future__ import annotations

from PIL import Image

from danqing import GenerationRequest, Settings, Studio
from danqing.synthetic.render import render
from danqing.synthetic.scenes import red_circle_left_of_blue_square

SOURCE = "a red circle left of a blue square"
TARGET = "a green circle left of a blue square"
BASE = dict(steps=20, sampler="DDIM", cfg_scale=7.0, width=64, height=64)


def main() -> None:
    studio = Studio(Settings.from_env())
    edit = studio.generate(GenerationRequest.create(prompt=TARGET, p2p_source=SOURCE, p2p_features=0.5, seed=1000,
                                                    batch_size=6, **BASE))
    plain = studio.generate(GenerationRequest.create(prompt=TARGET, seed=1000, batch_size=6, **BASE))
    real = []
    for scene in red_circle_left_of_blue_square(3):
        picture = render(scene)
        r = studio.generate(GenerationRequest.create(prompt=TARGET, p2p_source=SOURCE, p2p_features=0.5, seed=0,
                                                     **BASE), init_image=picture)
        real.append((picture, r.sources[0], r.images[0]))
    grid = Image.new("RGB", (64 * 6 + 16 + 64 * 3, 64 * 3), "white")
    for i in range(6):
        for row, img in enumerate((edit.sources[i], edit.images[i], plain.images[i])):
            grid.paste(img, (64 * i, 64 * row))
    for i, column in enumerate(real):
        for row, img in enumerate(column):
            grid.paste(img, (64 * 6 + 16 + 64 * i, 64 * row))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save("docs/images/p2p.png")


if __name__ == "__main__":
    main()
