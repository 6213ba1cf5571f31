"""The control projects of the course 《AI绘画核心技术与实战》 (2023) (practical project 4, "用ControlNet给你的创意上色"):

- ``colorize``: a line drawing + a prompt (+ optional colour hints) -> a coloured picture that
  keeps the lines (line-art ControlNet; hints are the img2img start picture);
- ``qr_art``: text -> QR code (segno) -> a ControlNet-guided picture that still scans: tries
  (strength, weight, seed) in turn until OpenCV's ``QRCodeDetector`` reads the payload back;
- ``creative_text``: a word in a font (any TrueType/OpenType file, CJK included) -> its mask ->
  a picture shaped like the word (canny ControlNet on the letters' outline, img2img from the
  mask filled with a colour);
- ``restyle``: a photo + a style prompt -> a restyled photo through canny (or depth) control,
  next to plain img2img at the same strength, with the structure each kept (edge F1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from danqing.apps import app_defaults, save_map, work_dir
from danqing.errors import InvalidRequest
from danqing.preprocess import run_preprocessor
from danqing.preprocess.metrics import canny_map, edge_f1
from danqing.request import GenerationRequest


def _request(**fields):
    return GenerationRequest.create(**{k: v for k, v in fields.items() if v is not None})


def _unit(model, image: str, module: str = "none", weight: float = 1.0, **kw) -> dict:
    return {"model": model, "image": image, "module": module, "weight": weight, **kw}


# -- line-art colourisation -----------------------------------------------------------------------
@dataclass
class ColorizeResult:
    image: Image.Image
    lines: Image.Image          # the control map (white lines on black)
    result: object              # the GenerationResult


def drawing_to_map(drawing: Image.Image, module: str = "invert") -> Image.Image:
    """A line drawing (dark lines on light paper, or already light-on-dark) -> the map the
    line-art ControlNet reads (white lines on black): ``invert`` for a clean drawing (A1111's
    "invert (from white bg & black line)"), ``lineart`` (XDoG) for a sketch or a photo."""

    grey = drawing.convert("L")
    if np.asarray(grey).mean() < 127:  # light lines on dark: make it a drawing first
        grey = Image.fromarray(255 - np.asarray(grey))
    return run_preprocessor(module, grey.convert("RGB"), resolution=min(grey.size))


def colorize(studio, drawing: Image.Image, prompt: str, *, hints: Image.Image | None = None, negative: str = "",
             model: str | None = None, seed: int = 0, size: int | None = None, weight: float | None = None,
             steps: int | None = None, checkpoint: str | None = None) -> ColorizeResult:
    """Colour a line drawing as the prompt says ("a red circle and a blue square").

    Args:
        drawing: the line art (black on white, or white on black).
        hints: optional colour hints (a rough colour sketch, same framing): img2img starts from
            them at ``hint_strength`` so their colours tend to stay where they are.
        model: the line-art ControlNet [default: data/apps/control.json].
    """
    d = app_defaults("colorize")
    size = size or d["size"]
    folder = work_dir(studio, "colorize")
    lines = drawing_to_map(drawing.resize((size, size), Image.LANCZOS), d["module"])
    unit = _unit(model or d["model"], save_map(lines, folder, "lines"), "none", weight if weight is not None else d["weight"])
    extra = {}
    if hints is not None:
        extra = {"init_image": save_map(hints.convert("RGB").resize((size, size), Image.LANCZOS), folder, "hints"),
                 "denoising_strength": d["hint_strength"]}
    req = _request(prompt=prompt, negative_prompt=negative, model=checkpoint, seed=seed, subseed=0, width=size,
                   height=size, steps=steps or d["steps"], cfg_scale=d["cfg_scale"], sampler=d["sampler"],
                   controlnet=(unit,), **extra)
    res = studio.generate(req, save=False)
    return ColorizeResult(res.images[0], lines, res)


# -- QR-code art ----------------------------------------------------------------------------------
ERROR_LEVELS = ("L", "M", "Q", "H")


def qr_matrix(text: str, error: str = "H", max_version: int = 40) -> np.ndarray:
    """The QR code of ``text`` (ISO/IEC 18004, made by segno) as a (n, n) bool matrix, True = dark,
    without quiet zone; the smallest version that holds it at error correction ``error``."""
    import segno

    if error not in ERROR_LEVELS:
        raise InvalidRequest("error", f"must be one of {', '.join(ERROR_LEVELS)} (QR error correction), got {error!r}")
    if not text:
        raise InvalidRequest("text", "the QR payload must not be empty")
    try:
        qr = segno.make_qr(text, error=error.lower(), boost_error=False, mode="byte", encoding="utf-8")
    except segno.DataOverflowError:
        qr = None
    if qr is None or qr.version > max_version:
        cap = qr_capacity(error, max_version)
        raise InvalidRequest("text", f"{len(text.encode())} bytes are too long for a QR code of version <= {max_version} "
                                     f"at error correction {error} (at most about {cap} bytes of text); shorten it "
                                     f"or choose a lower error correction ({', '.join(ERROR_LEVELS[:ERROR_LEVELS.index(error)]) or 'none lower'})")
    return np.array([[bool(v) for v in row] for row in qr.matrix])


def qr_capacity(error: str, version: int) -> int:
    """Bytes of 8-bit text (byte mode) that fit QR ``version`` at ``error`` (found with segno)."""
    import segno

    lo, hi = 0, 3000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            ok = segno.make_qr("a" * mid + "\u00e9", error=error.lower(), version=version, boost_error=False) is not None
        except (segno.DataOverflowError, ValueError):
            ok = False
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    return lo + 2  # "é" is 2 bytes (forces byte mode)


def qr_image(matrix: np.ndarray, size: int, border: int = 4) -> Image.Image:
    """The code drawn black on white with a ``border``-module quiet zone, scaled to size x size
    (nearest: modules stay sharp)."""
    m = np.pad(matrix, border, constant_values=False)
    img = Image.fromarray(np.where(m, 0, 255).astype(np.uint8)).convert("RGB")
    return img.resize((size, size), Image.NEAREST)


def decode_qr(image: Image.Image) -> str | None:
    """What OpenCV reads from the picture: its two QR readers (``QRCodeDetector`` and
    ``QRCodeDetectorAruco``) on the picture, on its Otsu binarisation (what a phone's scanner does
    first) and on a 4x cubic upscale of that. The decoded text, or None."""
    import cv2

    a = np.asarray(image.convert("RGB"))
    grey = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    _, otsu = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    big = cv2.resize(grey, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    _, big_otsu = cv2.threshold(big, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    for det in (cv2.QRCodeDetector(), cv2.QRCodeDetectorAruco()):
        for arr in (a, otsu, big_otsu):
            try:
                text = det.detectAndDecode(arr)[0]
            except cv2.error:
                text = ""
            if text:
                try:  # OpenCV hands byte-mode UTF-8 back as Latin-1 characters
                    return text.encode("latin-1").decode("utf-8")
                except (UnicodeEncodeError, UnicodeDecodeError):
                    return text
    return None


@dataclass
class QRResult:
    image: Image.Image | None
    decoded: str | None
    code: Image.Image
    attempts: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.decoded is not None


def qr_art(studio, text: str, prompt: str, *, negative: str = "", error: str | None = None, seed: int = 0,
           size: int | None = None, model: str | None = None, checkpoint: str | None = None,
           steps: int | None = None, max_attempts: int | None = None) -> QRResult:
    """A picture that is also a QR code of ``text``: img2img from the code with a canny
    ControlNet on its module edges, trying the (strength, weight) schedule of
    ``data/apps/control.json`` (most artistic first) with a few seeds each until OpenCV decodes
    ``text`` from the picture. ``decoded`` is None when no attempt scanned."""
    d = app_defaults("qr")
    size = size or d["size"]
    code = qr_image(qr_matrix(text, error or d["error"], d["max_version"]), size, d["border"])
    folder = work_dir(studio, "qr")
    code_path = save_map(code, folder, "code")
    attempts = []
    best = None
    plan = [(s, w, seed + k) for s, w in d["attempts"] for k in range(d["seeds_per_attempt"])]
    for strength, weight, sd in plan[:max_attempts or len(plan)]:
        req = _request(prompt=prompt, negative_prompt=negative, model=checkpoint, seed=sd, subseed=0, width=size,
                       height=size, steps=steps or d["steps"], cfg_scale=d["cfg_scale"], sampler=d["sampler"],
                       init_image=code_path, denoising_strength=strength,
                       controlnet=(_unit(model or d["model"], code_path, d["module"], weight),))
        img = studio.generate(req, save=False).images[0]
        got = decode_qr(img)
        attempts.append({"strength": strength, "weight": weight, "seed": sd, "decoded": got})
        best = img
        if got == text:
            return QRResult(img, got, code, attempts)
    return QRResult(best, None, code, attempts)


# -- creative text --------------------------------------------------------------------------------
NOTDEF_PROBE = "\U0010fffd"  # a code point (plane 16, private use) no font maps: it draws the .notdef box


def font_roots() -> list[Path]:
    """The usual system and user font folders (Linux, macOS, Windows)."""
    return [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts",
            Path.home() / ".local/share/fonts", Path("/System/Library/Fonts"), Path("/Library/Fonts"),
            Path("C:/Windows/Fonts")]


def missing_glyphs(path: str, text: str) -> list[str]:
    """The characters of ``text`` (whitespace aside, each once) that the font file ``path`` has no
    glyph for: those that draw no ink, or draw exactly the .notdef box (Pillow draws .notdef for an
    unmapped code point, so it is compared with the drawing of ``NOTDEF_PROBE``)."""
    font = ImageFont.truetype(path, 64)
    notdef = np.asarray(font.getmask(NOTDEF_PROBE))
    out = []
    for ch in dict.fromkeys(text):
        if ch.isspace():
            continue
        mask = font.getmask(ch)
        if mask.getbbox() is None or np.array_equal(np.asarray(mask), notdef):
            out.append(ch)
    return out


def find_font(name: str) -> str:
    """A font file: a path, or a file name found under the system font folders."""
    p = Path(name).expanduser()
    if p.is_file():
        return str(p)
    for root in font_roots():
        if root.is_dir():
            hit = next(iter(sorted(root.rglob(Path(name).name))), None)
            if hit:
                return str(hit)
    raise InvalidRequest("font", f"{name}: no such font file (give a .ttf/.otf/.ttc path; for Chinese, a CJK font "
                                 f"such as NotoSansCJK or WenQuanYi Micro Hei)")


def cjk_fonts() -> list[str]:
    """CJK-capable font files on this machine, best first: fontconfig's ``fc-list :lang=zh``
    (when fontconfig is installed), then the known file names of ``data/apps/control.json``
    (``text.cjk_fonts``: Noto Sans CJK, Source Han Sans, WenQuanYi, ...) under ``font_roots()``."""
    import shutil
    import subprocess

    found: list[str] = []
    if shutil.which("fc-list"):
        try:
            listed = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
        found += sorted(line.split(":")[0].strip() for line in listed.splitlines() if line.strip())
    names = app_defaults("text")["cjk_fonts"]
    rank = {n.lower(): i for i, n in enumerate(names)}
    known = []
    for root in font_roots():
        if root.is_dir():
            known += [p for p in root.rglob("*") if p.name.lower() in rank and p.is_file()]
    found += [str(p) for p in sorted(known, key=lambda p: (rank[p.name.lower()], str(p)))]
    return list(dict.fromkeys(found))


def choose_font(text: str, font: str | None = None) -> str:
    """The font file that draws ``text``: ``font`` when given (a path, or a file name under the
    system font folders); else the default (``data/apps/control.json``'s ``text.font``, DejaVu Sans
    Bold) when it covers the text, else the first CJK-capable font found (``cjk_fonts``) that does.
    A font that lacks characters is refused, naming them and the font to install."""
    d = app_defaults("text")
    if font:
        path = find_font(font)
        missing = missing_glyphs(path, text)
        if missing:
            better = next((c for c in cjk_fonts() if not missing_glyphs(c, text)), None)
            hint = f"e.g. {better}" if better else d["cjk_install"]
            raise InvalidRequest("font", f"{Path(path).name} has no glyph for {''.join(missing)!r}; give a font that "
                                         f"covers the word ({hint})")
        return path
    try:
        default = find_font(d["font"])
    except InvalidRequest:
        default = None
    candidates = ([default] if default else []) + cjk_fonts()
    for path in candidates:
        if not missing_glyphs(path, text):
            return path
    if not candidates:
        roots = ", ".join(str(r) for r in font_roots() if r.is_dir()) or "the system font folders"
        raise InvalidRequest("font", f"no font found (neither {d['font']} nor a CJK font) in {roots}; "
                                     f"{d['cjk_install']}")
    missing = [ch for ch in dict.fromkeys(text) if all(ch in missing_glyphs(c, ch) for c in candidates)]
    raise InvalidRequest("font", f"no installed font has a glyph for {''.join(missing) or text!r} (tried "
                                 f"{', '.join(Path(c).name for c in candidates)}); {d['cjk_install']}")


def word_mask(word: str, size: int, font: str | None = None, margin: float = 0.08) -> Image.Image:
    """``word`` rendered white on black, as large as fits size x size with a margin ("L"), in
    ``font`` or the font ``choose_font`` finds for it."""
    if not word.strip():
        raise InvalidRequest("text", "the word must not be empty")
    path = choose_font(word, font)
    lo, hi = 4, size * 2
    room = size * (1 - 2 * margin)
    while lo < hi:  # the largest font size whose box fits
        mid = (lo + hi + 1) // 2
        box = ImageFont.truetype(path, mid).getbbox(word)
        lo, hi = (mid, hi) if (box[2] - box[0] <= room and box[3] - box[1] <= room) else (lo, mid - 1)
    f = ImageFont.truetype(path, lo)
    x0, y0, x1, y1 = f.getbbox(word)
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).text(((size - (x1 - x0)) / 2 - x0, (size - (y1 - y0)) / 2 - y0), word, fill=255, font=f)
    return img


@dataclass
class TextArtResult:
    image: Image.Image
    mask: Image.Image
    iou: float          # the picture's saturated foreground vs the word's mask


def foreground(image: Image.Image) -> np.ndarray:
    """Saturated pixels (the shapes evaluator's object rule: HSV saturation > 0.4, value > 0.3)."""
    import cv2

    hsv = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2HSV)
    return (hsv[..., 1] > 0.4 * 255) & (hsv[..., 2] > 0.3 * 255)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter, union = (a & b).sum(), (a | b).sum()
    return float(inter / union) if union else 0.0


def creative_text(studio, word: str, prompt: str, *, font: str | None = None, fill: str | None = None,
                  negative: str = "", seed: int = 0, size: int | None = None, model: str | None = None,
                  checkpoint: str | None = None, strength: float | None = None,
                  steps: int | None = None, control: bool = True) -> TextArtResult:
    """A picture shaped like ``word``: its mask (in ``font``; when none is given the default font,
    or a CJK font found on the machine if the default lacks the word's characters: ``choose_font``)
    filled with colour ``fill`` on white is the img2img start, and a canny ControlNet holds the
    letters' outline (``control=False``: the same img2img without it, for comparison)."""
    from PIL import ImageColor

    d = app_defaults("text")
    size = size or d["size"]
    mask = word_mask(word, size, font)
    try:
        colour = ImageColor.getrgb(fill or d["fill"])
    except ValueError:
        raise InvalidRequest("fill", f"{fill!r} is not a colour name or #rrggbb") from None
    m = np.asarray(mask) > 127
    start = np.full((size, size, 3), 255, np.uint8)
    start[m] = colour
    folder = work_dir(studio, "text")
    start_path = save_map(Image.fromarray(start), folder, "start")
    req = _request(prompt=prompt, negative_prompt=negative, model=checkpoint, seed=seed, subseed=0, width=size,
                   height=size, steps=steps or d["steps"], cfg_scale=d["cfg_scale"], sampler=d["sampler"],
                   init_image=start_path, denoising_strength=strength or d["strength"],
                   controlnet=(_unit(model or d["model"], save_map(mask.convert("RGB"), folder, "mask"), d["module"],
                                     d["weight"]),) if control else ())
    img = studio.generate(req, save=False).images[0]
    return TextArtResult(img, mask, mask_iou(foreground(img), m))


# -- photo restyling ------------------------------------------------------------------------------
@dataclass
class RestyleResult:
    controlled: Image.Image
    plain: Image.Image
    f1_controlled: float  # edge F1 of each picture's Canny edges against the photo's
    f1_plain: float


def restyle(studio, photo: Image.Image, prompt: str, *, negative: str = "", seed: int = 0, size: int | None = None,
            model: str | None = None, module: str | None = None, checkpoint: str | None = None,
            strength: float | None = None, weight: float | None = None, steps: int | None = None) -> RestyleResult:
    """Restyle a photo as the prompt says, with a canny (or, given a depth ControlNet and
    module "depth", depth) ControlNet holding its structure; plain img2img at the same strength
    and seed beside it, and how much of the photo's edges each kept."""

    d = app_defaults("restyle")
    size = size or d["size"]
    pic = photo.convert("RGB")
    side = min(pic.size)
    pic = pic.crop(((pic.width - side) // 2, (pic.height - side) // 2, (pic.width + side) // 2,
                    (pic.height + side) // 2)).resize((size, size), Image.LANCZOS)
    folder = work_dir(studio, "restyle")
    path = save_map(pic, folder, "photo")
    base = dict(prompt=prompt, negative_prompt=negative, model=checkpoint, seed=seed, subseed=0, width=size,
                height=size, steps=steps or d["steps"], cfg_scale=d["cfg_scale"], sampler=d["sampler"],
                init_image=path, denoising_strength=strength or d["strength"])
    # pixel perfect: the map is made at the output size, so it is exactly the structure measured
    unit = _unit(model or d["model"], path, module or d["module"], weight if weight is not None else d["weight"],
                 pixel_perfect=True)
    controlled = studio.generate(_request(**base, controlnet=(unit,)), save=False).images[0]
    plain = studio.generate(_request(**base), save=False).images[0]
    ref = canny_map(pic)
    return RestyleResult(controlled, plain, edge_f1(canny_map(controlled), ref)["f1"], edge_f1(canny_map(plain), ref)["f1"])
