"""Outpainting in the img2img tab: the picture padded by N pixels on the chosen sides, the new
area as the inpaint mask, then the ordinary inpaint (A1111's "Poor man's outpainting" script).
The padding is pre-filled from the picture's edge (``editing.images.outpaint_canvas``), a start
the sampler repaints; inpaint pastes the kept region back unchanged (``editing.img2img``'s overlay)."""

from __future__ import annotations

from PIL import Image

from danqing.editing.images import outpaint_canvas
from danqing.server.ui_i18n import t

SIDES = ("left", "right", "top", "bottom")


def padded(picture: Image.Image, pixels: int, sides, feather: int = 0) -> tuple[Image.Image, Image.Image]:
    """(the padded picture, its mask: white on the new area, fading to black ``feather`` pixels
    into the original) from ``editing.images.outpaint_canvas``; sides among ``SIDES``."""
    sides = set(sides or ())
    if sides - set(SIDES) or not sides or pixels <= 0 or feather < 0:
        raise ValueError(f"outpaint: give pixels > 0, feather >= 0 and one or more of {', '.join(SIDES)}")
    left, right, up, down = (pixels if s in sides else 0 for s in SIDES)
    return outpaint_canvas(picture.convert("RGB"), left, right, up, down, feather=feather)


def outpaint_panel(gr, i: dict) -> None:
    """An accordion that pads the img2img picture and hands it, with its mask drawn as a layer,
    to the inpaint editor (then Generate inpaints the new area)."""
    with gr.Accordion(t("Outpaint"), open=False, elem_id="outpaint"):
        with gr.Row():
            pixels = gr.Slider(8, 256, 32, step=8, label=t("Pixels to add"), elem_id="outpaint_pixels")
            sides = gr.CheckboxGroup(list(SIDES), value=["right"], label=t("Sides"), elem_id="outpaint_sides")
        go = gr.Button(t("Pad and send to inpaint"), elem_id="outpaint_go")

    def pad(picture, n, chosen):
        if picture is None:
            raise gr.Error("outpaint: upload a picture in img2img first")
        try:
            canvas, mask = padded(picture, int(n), chosen)  # the seam's softening: the tab's Mask blur
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        layer.paste((255, 255, 255, 255), mask=mask)
        return ({"background": canvas, "layers": [layer], "composite": canvas},
                gr.Tabs(selected="img2img_mode_inpaint"), "inpaint")

    go.click(pad, inputs=[i["init"], pixels, sides], outputs=[i["editor"], i["modes"], i["mode"]])
