"""The portrait studio's first step (the course's project 5; FaceChain's pipeline): photos of
one person in, each accepted or rejected with a reason a person understands.

``ingest`` reads each photo (EXIF orientation applied), finds its faces and checks, in this
order: readable, within the pixel limit, a face, only one person, face large enough, sharp
enough, not turned too far, not a duplicate of an earlier accepted photo. The thresholds are an
``IngestPolicy`` (docs/apps.md, "Portrait studio", says what each measures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from danqing.errors import InvalidRequest
from danqing.faces.backend import Face, FaceBackend
from danqing.faces.fusion import main_face
from danqing.faces.geometry import face_span, sharpness, yaw
from danqing.pictures import MAX_PIXELS

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# code -> the reason shown for a rejected photo (formatted with the verdict's numbers)
REASONS = {
    "corrupt": "not a readable image ({detail})",
    "too-large": "{detail} is over the limit of {max_pixels} pixels",
    "no-face": "no face found (a clear, frontal face is needed)",
    "several-faces": "{faces} faces: one person per photo",
    "too-small": "face too small ({side:.0f} px; at least {min_face} px)",
    "blurred": "face blurred (sharpness {sharpness:.1f}; at least {min_sharpness})",
    "profile": "face turned too far to the side (yaw {yaw:+.2f}; at most +/-{max_yaw})",
    "duplicate": "duplicate of {duplicate_of} (face distance {distance:.2f}, under {duplicate_distance})",
}


@dataclass(frozen=True)
class IngestPolicy:
    """What a usable photo is.

    Attributes:
        min_face: the face box's shorter side, in pixels of the photo (a 512 training crop
            from an 80 px face is already a 6x enlargement).
        min_sharpness: ``faces.geometry.sharpness`` (contrast-normalised variance of the
            Laplacian of the face at 128 x 128): sharp photos 6-15, a 1 px blur about 2.
        max_yaw: ``faces.geometry.yaw``: 0 frontal, +/-1 the nose in line with an eye.
        several_ratio: a second confident face at least this fraction of the main face's size
            makes a photo a group photo (smaller faces far behind are tolerated).
        max_pixels: larger photos are refused before they are decoded.
        duplicate_distance: None = the backend's own (dlib: 0.1).
        min_photos: how many accepted photos a person needs.
        keep_span: an accepted photo is kept in memory scaled down until its face span (eye
            distance) is at most this many pixels (face crops up to 4x this side stay at full
            detail); a rejected one is kept as a 512 px thumbnail for the contact sheet.
    """

    min_face: int = 80
    min_sharpness: float = 1.5
    max_yaw: float = 0.5
    several_ratio: float = 0.5
    max_pixels: int = MAX_PIXELS
    duplicate_distance: float | None = None
    min_photos: int = 3
    keep_span: int = 384


@dataclass
class PhotoVerdict:
    """One photo, accepted (``code == "ok"``) or rejected with ``reason``.

    ``image`` is the photo upright (EXIF orientation applied), RGB uint8 (H, W, 3); ``face``
    its main face and ``embedding`` that face's identity vector (None when not reached)."""

    path: Path
    code: str = "ok"
    reason: str = ""
    image: np.ndarray | None = field(default=None, repr=False)
    face: Face | None = None
    faces: int = 0
    embedding: np.ndarray | None = field(default=None, repr=False)
    sharpness: float | None = None
    yaw: float | None = None
    duplicate_of: Path | None = None
    others: list[Face] = field(default_factory=list, repr=False)  # the other faces that count

    @property
    def accepted(self) -> bool:
        return self.code == "ok"


@dataclass
class IngestReport:
    verdicts: list[PhotoVerdict]
    backend: str
    policy: IngestPolicy

    @property
    def accepted(self) -> list[PhotoVerdict]:
        return [v for v in self.verdicts if v.accepted]

    @property
    def rejected(self) -> list[PhotoVerdict]:
        return [v for v in self.verdicts if not v.accepted]


def photo_files(items: list[str | Path]) -> list[Path]:
    """Files and folders -> photo files: a folder gives its photos (``PHOTO_SUFFIXES``, sorted by
    name, not its subfolders); a file is taken as it is (a non-image is then rejected as
    unreadable).

    Raises:
        InvalidRequest: a path that does not exist, or no photo at all.
    """
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise InvalidRequest("photos", f"{p}: no such file or folder")
    if not out:
        raise InvalidRequest("photos", f"no photos ({', '.join(PHOTO_SUFFIXES)}) in "
                                       f"{', '.join(str(i) for i in items) or 'nothing given'}")
    return list(dict.fromkeys(out))


def read_photo(path: Path, max_pixels: int) -> tuple[np.ndarray | None, str, str]:
    """(RGB uint8 picture upright, "", "") or (None, code, detail) for a photo that cannot be used."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                return None, "too-large", f"{w}x{h}"
            im = ImageOps.exif_transpose(im)
            rgb = im.convert("RGBA").convert("RGB") if im.mode in ("P", "LA", "PA") else im.convert("RGB")
            return np.asarray(rgb), "", ""
    except Image.DecompressionBombError:  # Pillow's own limit, at twice its 89 megapixels
        return None, "too-large", "the image"
    except UnidentifiedImageError:
        return None, "corrupt", "not an image format Pillow reads, or a damaged file"
    except (OSError, ValueError, SyntaxError) as exc:
        detail = str(exc).replace(str(path), "").strip(" :'") or type(exc).__name__
        return None, "corrupt", detail.splitlines()[0][:120]


def _reason(v: PhotoVerdict, policy: IngestPolicy, **numbers) -> str:
    values = {"min_face": policy.min_face, "min_sharpness": policy.min_sharpness, "max_yaw": policy.max_yaw,
              "max_pixels": policy.max_pixels, "sharpness": v.sharpness or 0.0, "yaw": v.yaw or 0.0,
              "faces": v.faces, "side": v.face.side if v.face else 0.0,
              "duplicate_of": v.duplicate_of.name if v.duplicate_of else "", **numbers}
    return REASONS[v.code].format(**values)


def check_photo(path: Path, backend: FaceBackend, policy: IngestPolicy) -> PhotoVerdict:
    """The verdict on one photo, every check but the duplicates (``ingest`` compares photos)."""
    v = PhotoVerdict(path)
    image, code, detail = read_photo(path, policy.max_pixels)
    if image is None:
        v.code = code
        v.reason = _reason(v, policy, detail=detail)
        return v
    v.image = image
    faces = backend.detect(image)
    face = main_face(faces)
    v.face = face
    confident = [f for f in faces if f.score >= backend.confident_score]
    v.others = [f for f in confident if f is not face and f.side >= policy.several_ratio * face.side] if face else []
    v.faces = 1 + len(v.others) if face else 0
    if face is not None:
        v.sharpness, v.yaw = sharpness(image, face), yaw(face)
    if face is None:
        v.code = "no-face"
    elif v.faces > 1:
        v.code = "several-faces"
    elif face.side < policy.min_face:
        v.code = "too-small"
    elif v.sharpness < policy.min_sharpness:
        v.code = "blurred"
    elif abs(v.yaw) > policy.max_yaw:
        v.code = "profile"
    else:
        v.embedding = backend.embed(image, face)
    if not v.accepted:
        v.reason = _reason(v, policy)
    _shrink(v, 1.0 if face is None or not v.accepted else policy.keep_span / face_span(face),
            512 / max(image.shape[:2]) if not v.accepted else 1.0)
    return v


def _shrink(v: PhotoVerdict, *scales: float) -> None:
    """Keep ``v.image`` (and its face) scaled down by the smallest of ``scales`` when under 1,
    so that 20 phone photos do not each hold 24 million pixels."""
    import cv2

    s = min(scales)
    if s < 1.0 and v.image is not None:
        v.image = cv2.resize(v.image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        v.face = v.face.scaled(s) if v.face is not None else None
        v.others = [f.scaled(s) for f in v.others]


def ingest(items: list[str | Path], backend: FaceBackend, policy: IngestPolicy = IngestPolicy()) -> IngestReport:
    """Every photo of ``items`` (files or folders) with its verdict, in order. Of photos whose
    faces are closer than the duplicate distance, the first stays and the others are rejected.

    Raises:
        InvalidRequest: a path that does not exist.
    """
    limit = policy.duplicate_distance if policy.duplicate_distance is not None else backend.duplicate_distance
    verdicts: list[PhotoVerdict] = []
    for path in photo_files(items):
        v = check_photo(path, backend, policy)
        if v.accepted:
            for earlier in verdicts:
                if earlier.accepted and (d := backend.distance(v.embedding, earlier.embedding)) < limit:
                    v.code, v.duplicate_of = "duplicate", earlier.path
                    v.reason = _reason(v, policy, distance=d, duplicate_distance=limit)
                    break
        verdicts.append(v)
    return IngestReport(verdicts, backend.describe(), policy)


def verdict_table(report: IngestReport):
    """The verdicts as a ``rich`` table: photo, face size, sharpness, yaw, verdict."""
    from rich.table import Table

    table = Table(title=f"{len(report.accepted)} of {len(report.verdicts)} photos accepted")
    for name, justify in (("#", "right"), ("photo", "left"), ("face px", "right"), ("sharpness", "right"),
                          ("yaw", "right"), ("verdict", "left")):
        table.add_column(name, justify=justify)
    for i, v in enumerate(report.verdicts, 1):
        table.add_row(str(i), v.path.name, f"{v.face.side:.0f}" if v.face else "-",
                      f"{v.sharpness:.1f}" if v.sharpness is not None else "-",
                      f"{v.yaw:+.2f}" if v.yaw is not None else "-",
                      "[green]accepted[/]" if v.accepted else f"[red]{v.reason}[/]")
    return table


def contact_sheet(report: IngestReport, *, thumb: int = 192, columns: int = 5) -> Image.Image:
    """Every photo as a thumbnail with its face box (green: accepted, red: rejected) and its
    verdict written under it."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    label_h = 58  # the name and three lines of the verdict
    rows = max(1, math.ceil(len(report.verdicts) / columns))
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label_h)), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    for i, v in enumerate(report.verdicts):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + label_h)
        colour = (30, 150, 60) if v.accepted else (200, 40, 40)
        if v.image is not None:
            pic = Image.fromarray(v.image)
            s = min(thumb / pic.width, thumb / pic.height)
            small = pic.resize((max(1, round(pic.width * s)), max(1, round(pic.height * s))), Image.LANCZOS)
            ox, oy = x + (thumb - small.width) // 2, y + (thumb - small.height) // 2
            sheet.paste(small, (ox, oy))
            for face in ([v.face] if v.face is not None else []) + v.others:
                x0, y0, x1, y1 = face.box
                draw.rectangle([ox + x0 * s, oy + y0 * s, ox + x1 * s, oy + y1 * s], outline=colour, width=2)
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=colour, width=3)
        text = "accepted" if v.accepted else v.reason
        chars = max(8, thumb // 7)  # the default font at 12 px: about 7 px a character
        lines = [v.path.name[:chars]] + _wrap(text, chars)[:3]
        draw.multiline_text((x + 4, y + thumb + 2), "\n".join(lines), fill=colour if not v.accepted else (0, 0, 0),
                            font=font, spacing=1)
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]
