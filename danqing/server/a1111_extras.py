"""A1111's Extras routes (``/sdapi/v1/extra-single-image``, ``/extra-batch-images``) and the rest of
its small routes: face restorers, Real-ESRGAN models, hypernetworks, script info, LoRA refresh,
checkpoint unload and reload (docs/api.md).

The Extras fields are data, as the txt2img fields are (``server/a1111.py``): every field is in
exactly one table -- ``EXTRAS_UPSCALE`` (how the picture is upscaled), ``EXTRAS_FACES`` (face
restoration), ``EXTRAS_SHELL`` (pictures in and out) or ``EXTRAS_NO_EFFECT`` (fields A1111 1.10
itself reads nowhere in the API, listed with the reason). The order is A1111's: upscale
(``scripts/postprocessing_upscale.py``), then GFPGAN; CodeFormer is a 422 naming the field (danqing has no
CodeFormer). Extras run in the request, beside the job queue, as A1111 runs them beside its own.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Literal, Optional

from fastapi import APIRouter
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from danqing.editing.faces import restore_faces
from danqing.editing.upscale import upscale_image
from danqing.editing.upscalers import BUILTIN
from danqing.errors import InvalidRequest
from danqing.models.names import Named, resolve
from danqing.server.a1111_scripts import PROMPTS, PROMPTS_ARGS, XYZ, XYZ_ARGS
from danqing.server.common import infotext_of_image
from danqing.server.security import decode_image
from danqing.server.state import VAE_NONE

EXTRAS_UPSCALE = {"resize_mode", "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop",
                  "upscaler_1", "upscaler_2", "extras_upscaler_2_visibility"}
EXTRAS_FACES = {"gfpgan_visibility", "codeformer_visibility", "codeformer_weight"}
EXTRAS_SHELL = {"image", "imageList"}
EXTRAS_NO_EFFECT = {
    "show_extras_results": "A1111 returns the pictures of single and batch mode whatever its value",
    "upscale_first": "A1111 1.10 orders the steps by its scripts (upscale, then faces) and reads it nowhere",
}
NO_UPSCALER = ("None", "", None)  # A1111's "None" upscaler: the picture keeps its size


class ExtrasBody(BaseModel):
    """A1111 ``ExtrasBaseRequest`` (version 1.10: the same fields, ranges and defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    resize_mode: Literal[0, 1] = 0  # 0: scale by upscaling_resize; 1: to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: Optional[str] = "None"
    upscaler_2: Optional[str] = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleBody(ExtrasBody):
    """A1111 ``ExtrasSingleImageRequest``."""

    image: str = ""


class FileData(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    data: str
    name: str  # A1111 names saved files with it; the API saves nothing


class ExtrasBatchBody(ExtrasBody):
    """A1111 ``ExtrasBatchImagesRequest``."""

    imageList: list[FileData]  # noqa: N815 -- A1111's field name


def upscale_size(width: int, height: int, body: ExtrasBody) -> tuple[float, int, int]:
    """(factor, width, height) of the upscaled picture, as A1111's ``Upscaler.upscale`` sizes it:
    the factor's size rounded down to a multiple of 8 (scale to: the factor that covers
    ``upscaling_resize_w`` x ``upscaling_resize_h``)."""
    if body.resize_mode == 1:
        factor = max(body.upscaling_resize_w / width, body.upscaling_resize_h / height)
    else:
        factor = body.upscaling_resize
    return factor, int((width * factor) // 8 * 8), int((height * factor) // 8 * 8)


def _upscaler(state, value: Optional[str], field: str) -> Optional[str]:
    if value in NO_UPSCALER:
        return None
    names = state.worker.studio.upscalers.names()
    return resolve(value, [Named(n) for n in names], field=field, what="upscaler", folder="upscalers").name


def check_extras(state, body: ExtrasBody, sizes: list[tuple[int, int]]) -> dict:
    """The plan of an Extras request, every field checked before any picture is touched:
    upscaler names, face model, final sizes against ``max_pixels``."""
    if body.codeformer_visibility > 0:
        raise InvalidRequest("codeformer_visibility", "CodeFormer face restoration is not available in danqing; "
                                                      "use gfpgan_visibility (GFPGAN files in models/face_restore/)")
    plan = {"upscaler_1": _upscaler(state, body.upscaler_1, "upscaler_1"),
            "upscaler_2": _upscaler(state, body.upscaler_2, "upscaler_2"), "face": None}
    if plan["upscaler_1"] is None or body.extras_upscaler_2_visibility == 0:
        plan["upscaler_2"] = None  # A1111: upscaler 2 only beside upscaler 1, and only when visible
    if body.gfpgan_visibility > 0:
        try:
            plan["face"] = state.worker.studio.upscalers.face_model_name(None)
        except InvalidRequest as exc:
            raise InvalidRequest("gfpgan_visibility", str(exc).split(": ", 1)[-1]) from None
    if plan["upscaler_1"] is not None:
        limit = state.server.max_pixels
        for i, (w, h) in enumerate(sizes):
            _, tw, th = upscale_size(w, h, body)
            if body.resize_mode == 1 and body.upscaling_crop:
                tw, th = body.upscaling_resize_w, body.upscaling_resize_h
            if tw < 8 or th < 8:
                raise InvalidRequest("upscaling_resize", f"picture {i}: {w}x{h} upscaled is {tw}x{th}, less than 8 "
                                                         f"pixels on a side")
            if tw * th > limit:
                raise InvalidRequest("upscaling_resize", f"picture {i}: {w}x{h} upscaled is {tw}x{th} = {tw * th} "
                                                         f"pixels, more than the limit of {limit} (max_pixels)")
    return plan


def extras_picture(studio, img: Image.Image, body: ExtrasBody, plan: dict) -> tuple[Image.Image, dict]:
    """One picture through A1111's postprocessing steps: upscale (blended with upscaler 2, then
    cropped to fit), then GFPGAN. Returns the picture and A1111's ``postprocessing`` pairs."""
    info: dict = {}
    img = img.convert("RGB")
    if plan["upscaler_1"] is not None:
        factor, w, h = upscale_size(img.width, img.height, body)
        if body.resize_mode == 1:
            info["Postprocess upscale to"] = f"{body.upscaling_resize_w}x{body.upscaling_resize_h}"
        else:
            info["Postprocess upscale by"] = f"{factor:g}"
        out = upscale_image(img, w, h, plan["upscaler_1"], studio.upscalers)
        info["Postprocess upscaler"] = plan["upscaler_1"]
        if plan["upscaler_2"] is not None:
            second = upscale_image(img, w, h, plan["upscaler_2"], studio.upscalers)
            out = Image.blend(out, second, body.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = plan["upscaler_2"]
        if body.resize_mode == 1 and body.upscaling_crop:  # centred on the target canvas, as A1111 pastes it
            tw, th = body.upscaling_resize_w, body.upscaling_resize_h
            canvas = Image.new("RGB", (tw, th))
            canvas.paste(out, (tw // 2 - out.width // 2, th // 2 - out.height // 2))
            out = canvas
            info["Postprocess crop to"] = f"{tw}x{th}"
        img = out
    if plan["face"] is not None:
        img, _ = restore_faces(img, studio.upscalers.face_model(plan["face"]), visibility=body.gfpgan_visibility)
        info["GFPGAN visibility"] = f"{round(body.gfpgan_visibility, 3):g}"
    return img, info


def _infotext(info: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())


def _png_b64(img: Image.Image, parameters: str, postprocessing: str) -> str:
    """The picture as A1111 sends it: PNG with the source's ``parameters`` and the steps done."""
    meta = PngImagePlugin.PngInfo()
    if parameters:
        meta.add_text("parameters", parameters)
    if postprocessing:
        meta.add_text("postprocessing", postprocessing)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()


def plaintext_to_html(text: str) -> str:
    """A1111's ``html_info``: the text escaped, lines joined with <br>."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def _scale_of(name: str) -> int:
    """A model upscaler's factor from its name ("4x-UltraSharp", "RealESRGAN_x2"), as A1111's UI
    guesses it; 4 when the name says none."""
    m = re.search(r"(\d)[xX]|[xX](\d)", name)
    return int(m.group(1) or m.group(2)) if m else 4


def extras_routes(r: APIRouter, state) -> None:
    """Extras (single picture and batch) and the small listing and model routes."""

    def run(body: ExtrasBody, pictures: list[Image.Image]) -> tuple[list[str], str]:
        plan = check_extras(state, body, [p.size for p in pictures])
        out, text = [], ""
        for picture in pictures:
            img, info = extras_picture(state.worker.studio, picture, body, plan)
            text = _infotext(info)
            out.append(_png_b64(img, infotext_of_image(picture), text))
        return out, plaintext_to_html(text)

    @r.post("/extra-single-image", summary="Extras: upscale and restore faces (A1111 fields)")
    def extra_single_image(body: ExtrasSingleBody) -> dict:
        images, info = run(body, [decode_image(body.image, "image", state.limits)])
        return {"html_info": info, "image": images[0]}

    @r.post("/extra-batch-images", summary="Extras over several pictures (A1111 fields)")
    def extra_batch_images(body: ExtrasBatchBody) -> dict:
        if len(body.imageList) > state.server.max_batch_images:
            raise InvalidRequest("imageList", f"{len(body.imageList)} pictures is more than the limit of "
                                              f"{state.server.max_batch_images} (max_batch_images)")
        pictures = [decode_image(f.data, f"imageList.{i}.data", state.limits) for i, f in enumerate(body.imageList)]
        images, info = run(body, pictures)
        return {"html_info": info, "images": images}

    @r.get("/face-restorers")
    def face_restorers() -> list[dict]:
        return [{"name": n, "cmd_dir": None} for n in state.worker.studio.upscalers.face_names()]

    @r.get("/realesrgan-models")
    def realesrgan_models() -> list[dict]:
        # the installed model upscalers (danqing runs every architecture spandrel reads, not only Real-ESRGAN)
        return [{"name": n, "path": None, "scale": _scale_of(n)}
                for n in state.worker.studio.upscalers.names() if n not in BUILTIN]

    @r.get("/hypernetworks")
    def hypernetworks() -> list[dict]:
        return []  # danqing has no hypernetworks (A1111's are a legacy format); LoRAs do their work

    @r.get("/script-info")
    def script_info() -> list[dict]:
        out = []
        for is_img2img in (False, True):
            for name, table in ((XYZ, XYZ_ARGS), (PROMPTS, PROMPTS_ARGS)):
                out.append({"name": name, "is_alwayson": False, "is_img2img": is_img2img,
                            "args": [{"label": label, "value": value, "minimum": None, "maximum": None, "step": None,
                                      "choices": None} for label, value in table]})
        return out

    @r.post("/refresh-loras")
    def refresh_loras() -> None:
        return None  # the registry scans models/lora on every listing and every request

    @r.post("/unload-checkpoint")
    def unload_checkpoint() -> dict:
        state.worker.studio.models.unload_all()  # a running job keeps its own references until it ends
        return {}

    @r.post("/reload-checkpoint")
    def reload_checkpoint() -> dict:
        opts = state.options()
        vae = None if opts["sd_vae"] in VAE_NONE else opts["sd_vae"]
        state.worker.studio.models.load(opts["sd_model_checkpoint"], vae)
        return {}
