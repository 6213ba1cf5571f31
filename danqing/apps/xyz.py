"""The X/Y/Z plot: one request varied along up to three axes, a labelled grid per Z value, and
every cell saved as its own PNG with its own infotext (docs/apps.md, "Workflow tools").

Axes are A1111's (``scripts/xyz_grid.py``): ``AXES`` lists every A1111 axis label in A1111's
order, so the positional ``script_args`` of its API (an axis is an index into the txt2img or
img2img list) select the same axis here; each row says which request field it sets and how its
values are read. Values use A1111's syntax (``parse_values``): a comma list read as CSV (so
``"a, b", c`` is two items), integer ranges ``1-5`` and ``1-10 (+2)``, counted ranges
``1-10 [3]`` and ``0.2-1 [5]``.
"""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from danqing.apps.control_projects import choose_font
from danqing.apps.prompting import Prompting, expand_request
from danqing.conditioning.styles import apply_styles
from danqing.errors import InvalidRequest
from danqing.outputs.infotext import format_infotext, parse_infotext
from danqing.outputs.store import save_png
from danqing.request import MAX_SEED, GenerationRequest
from danqing.sampling.samplers import samplers, schedule_names

DEFAULT_MAX_CELLS = 100  # cells of one plot (x * y * z); the CLI's --max-cells, the server's max_batch_images

# A1111's range expressions (xyz_grid.py: re_range, re_range_float, re_range_count, re_range_count_float)
_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_FLOAT_RANGE = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_FLOAT_COUNT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def _num(text: str) -> str:
    return text.replace(" ", "")


def csv_items(text: str) -> list[str]:
    """A1111's ``csv_string_to_list_strip``: the items of one CSV line, stripped."""
    return [s.strip() for s in chain.from_iterable(csv.reader(io.StringIO(text), skipinitialspace=True))]


def parse_values(text: str, kind: type, *, field: str = "values") -> list:
    """An axis's values as A1111 expands them (``process_axis``).

    ``kind`` int: ``1-5`` -> 1..5, ``1-10 (+2)`` -> 1, 3, ..., 9 (``range``), ``1-10 [3]`` ->
    ``int`` of 3 evenly spaced numbers; float: ``0-1 (+0.25)`` (``arange`` up to the end, inclusive),
    ``0.2-1 [5]`` (``linspace``); str: the CSV items as they are.
    """
    items = csv_items(text)
    out: list = []
    for item in items:
        if kind is str:
            out.append(item)
            continue
        if not item.strip():
            continue
        if kind is int:
            m, mc = _INT_RANGE.fullmatch(item), _INT_COUNT.fullmatch(item)
            if m is not None:
                step = int(m.group(3)) if m.group(3) else 1
                out += list(range(int(_num(m.group(1))), int(_num(m.group(2))) + 1, step))
                continue
            if mc is not None:
                num = int(mc.group(3)) if mc.group(3) else 1
                out += [int(x) for x in np.linspace(int(_num(mc.group(1))), int(_num(mc.group(2))), num).tolist()]
                continue
        else:
            m, mc = _FLOAT_RANGE.fullmatch(item), _FLOAT_COUNT.fullmatch(item)
            if m is not None:
                start, end = float(_num(m.group(1))), float(_num(m.group(2)))
                step = float(m.group(3)) if m.group(3) else 1.0
                out += np.arange(start, end + step, step).tolist()
                continue
            if mc is not None:
                num = int(float(mc.group(3))) if mc.group(3) else 1
                out += np.linspace(float(_num(mc.group(1))), float(_num(mc.group(2))), num).tolist()
                continue
        try:
            out.append(kind(item))
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise InvalidRequest(field, f"{item!r} is not {what} or a range (1-5, 1-10 (+2), 0.2-1 [5])") from None
    return out


# -- how an axis changes a request's fields --------------------------------------------------------
def _set(name: str) -> Callable:
    def apply(f: dict, x: Any, xs: list, ctx: dict) -> None:
        f[name] = x
    return apply


def _prompt_sr(f: dict, x: str, xs: list, ctx: dict) -> None:
    """A1111's Prompt S/R: the first value is searched for and replaced by each value, in the
    prompt and the negative prompt."""
    search = xs[0]
    if search not in f["prompt"] and search not in f["negative_prompt"]:
        raise InvalidRequest("Prompt S/R", f"{search!r} (the first value) is found in neither the prompt nor the "
                                           f"negative prompt")
    f["prompt"] = f["prompt"].replace(search, x)
    f["negative_prompt"] = f["negative_prompt"].replace(search, x)


def _size(f: dict, x: str, xs: list, ctx: dict) -> None:
    w, sep, h = x.lower().partition("x")
    try:
        f["width"], f["height"] = int(w.strip()), int(h.strip())
    except ValueError:
        raise InvalidRequest("Size", f"{x!r} is not WIDTHxHEIGHT (e.g. 512x768)") from None


def _named(name: str, table: Callable[[], list[str]], what: str) -> Callable:
    def apply(f: dict, x: str, xs: list, ctx: dict) -> None:
        known = {n.casefold(): n for n in table()}
        f[name] = known.get(x.casefold(), x)  # unknown: the request refuses it, listing the valid ones
    return apply


def _optional_name(name: str) -> Callable:
    def apply(f: dict, x: str, xs: list, ctx: dict) -> None:
        f[name] = None if x.casefold() in ("none", "automatic", "") else re.sub(r" \[[0-9a-fA-F]+\]$", "", x)
    return apply


def _styles(f: dict, x: str, xs: list, ctx: dict) -> None:
    names = [n.strip() for n in x.split(",") if n.strip()]
    f["prompt"], f["negative_prompt"] = apply_styles(f["prompt"], f["negative_prompt"], names,
                                                     ctx.get("styles") or {}, field="Styles")


def _rng(f: dict, x: str, xs: list, ctx: dict) -> None:
    value = {"cpu": "cpu", "gpu": "gpu"}.get(x.casefold())
    if value is None:
        raise InvalidRequest("RNG source", f"{x!r}: danqing draws noise on the CPU or the GPU (CPU, GPU)")
    f["rng"] = value


def _face_restore(f: dict, x: str, xs: list, ctx: dict) -> None:
    key = x.casefold()
    f["restore_faces"] = key not in ("false", "none", "no", "")
    f["face_restoration_model"] = None if key in ("true", "false", "none", "no", "yes", "") else x


def _nothing(f: dict, x: Any, xs: list, ctx: dict) -> None:
    return None


@dataclass(frozen=True)
class AxisType:
    """One axis: A1111's label, where it exists (txt2img, img2img, both, or danqing only), the
    type of its values, how it changes the request (None: not available in danqing), and
    whether its grid labels read ``Label: value`` or only the value."""

    label: str
    scope: str
    kind: type
    apply: Callable | None
    labelled: bool = True
    aliases: tuple[str, ...] = ()

    @property
    def dropdown(self) -> bool:
        """A1111 reads this axis's values from its dropdown list (``x_values_dropdown``), not the
        text box, unless ``csv_mode``."""
        return self.label in DROPDOWN


_T, _I, _B, _D = "txt2img", "img2img", "both", "danqing"
# Every A1111 axis, in A1111's order (its txt2img and img2img lists are the rows of their scope
# and "both"); the "danqing" rows come after and have no A1111 index.
AXES: tuple[AxisType, ...] = (
    AxisType("Nothing", _B, str, _nothing, labelled=False),
    AxisType("Seed", _B, int, _set("seed"), aliases=("seed",)),
    AxisType("Var. seed", _B, int, _set("subseed"), aliases=("subseed",)),
    AxisType("Var. strength", _B, float, _set("subseed_strength"), aliases=("subseed_strength",)),
    AxisType("Steps", _B, int, _set("steps"), aliases=("steps",)),
    AxisType("Hires steps", _T, int, _set("hr_second_pass_steps"), aliases=("hr_second_pass_steps",)),
    AxisType("CFG Scale", _B, float, _set("cfg_scale"), aliases=("cfg_scale", "cfg")),
    AxisType("Image CFG Scale", _I, float, _set("image_cfg_scale"), aliases=("image_cfg_scale",)),
    AxisType("Prompt S/R", _B, str, _prompt_sr, labelled=False, aliases=("prompt", "sr")),
    AxisType("Prompt order", _B, str, None),
    AxisType("Sampler", _T, str, _named("sampler", lambda: list(samplers()), "sampler"), labelled=False,
             aliases=("sampler", "sampler_name")),
    AxisType("Hires sampler", _T, str, _named("hr_sampler_name", lambda: list(samplers()), "sampler"),
             aliases=("hr_sampler_name",)),
    AxisType("Sampler", _I, str, _named("sampler", lambda: list(samplers()), "sampler"), labelled=False),
    AxisType("Checkpoint name", _B, str, _optional_name("model"), labelled=False, aliases=("model", "checkpoint")),
    AxisType("Negative Guidance minimum sigma", _B, float, None),
    AxisType("Sigma Churn", _B, float, None),
    AxisType("Sigma min", _B, float, None),
    AxisType("Sigma max", _B, float, None),
    AxisType("Sigma noise", _B, float, None),
    AxisType("Schedule type", _B, str, _named("schedule", schedule_names, "schedule"),
             aliases=("schedule", "scheduler")),
    AxisType("Schedule min sigma", _B, float, None),
    AxisType("Schedule max sigma", _B, float, None),
    AxisType("Schedule rho", _B, float, None),
    AxisType("Skip Early CFG", _B, float, None),
    AxisType("Beta schedule alpha", _B, float, None),
    AxisType("Beta schedule beta", _B, float, None),
    AxisType("Eta", _B, float, None),
    AxisType("Clip skip", _B, int, _set("clip_skip"), aliases=("clip_skip",)),
    AxisType("Denoising", _B, float, _set("denoising_strength"), aliases=("denoising_strength", "denoise")),
    AxisType("Initial noise multiplier", _B, float, None),
    AxisType("Extra noise", _B, float, None),
    AxisType("Hires upscaler", _T, str, _set("hr_upscaler"), aliases=("hr_upscaler",)),
    AxisType("Cond. Image Mask Weight", _I, float, None),
    AxisType("VAE", _B, str, _optional_name("vae"), aliases=("vae",)),
    AxisType("Styles", _B, str, _styles, aliases=("style",)),
    AxisType("UniPC Order", _B, int, None),
    AxisType("Face restore", _B, str, _face_restore, aliases=("restore_faces",)),
    AxisType("Token merging ratio", _B, float, None),
    AxisType("Token merging ratio high-res", _B, float, None),
    AxisType("Always discard next-to-last sigma", _B, str, None),
    AxisType("SGM noise multiplier", _B, str, None),
    AxisType("Refiner checkpoint", _B, str, _optional_name("refiner_checkpoint"), aliases=("refiner_checkpoint",)),
    AxisType("Refiner switch at", _B, float, _set("refiner_switch_at"), aliases=("refiner_switch_at",)),
    AxisType("RNG source", _B, str, _rng, aliases=("rng",)),
    AxisType("FP8 mode", _B, str, None),
    AxisType("Size", _B, str, _size, aliases=("size",)),
    AxisType("Width", _D, int, _set("width"), aliases=("width",)),
    AxisType("Height", _D, int, _set("height"), aliases=("height",)),
)


# A1111 axes with ``choices`` (their values come from the dropdown list in its API)
DROPDOWN = frozenset({"Sampler", "Hires sampler", "Checkpoint name", "Schedule type", "Hires upscaler", "VAE", "Styles",
                      "Always discard next-to-last sigma", "SGM noise multiplier", "Refiner checkpoint", "RNG source",
                      "FP8 mode"})


def a1111_axes(img2img: bool) -> list[AxisType]:
    """A1111's axis list of txt2img or img2img: its ``script_args`` axis indices index this."""
    mine = _I if img2img else _T
    return [a for a in AXES if a.scope in (_B, mine)]


def supported_labels() -> list[str]:
    return list(dict.fromkeys(a.label for a in AXES if a.apply is not None))


def find_axis(name: str, *, img2img: bool = False) -> AxisType:
    """An axis by A1111 label or danqing alias (a request field name), case-insensitively."""
    key = name.strip().casefold()
    mine = _I if img2img else _T
    for a in AXES:
        if a.scope in (_B, mine, _D) and (key == a.label.casefold() or key in a.aliases):
            if a.apply is None:
                raise InvalidRequest("axis", f"the A1111 axis {a.label!r} is not available in danqing; available: "
                                             f"{', '.join(supported_labels())}")
            return a
    raise InvalidRequest("axis", f"unknown axis {name[:120]!r}; available: {', '.join(supported_labels())}")


@dataclass(frozen=True)
class Axis:
    """An axis with its values (``values_text`` as given, for the grid's infotext)."""

    type: AxisType
    values: tuple
    values_text: str = ""

    def label(self, value: Any) -> str:
        if self.type.label == "Nothing":
            return ""
        if isinstance(value, float):
            value = round(value, 8)
        return f"{self.type.label}: {value}" if self.type.labelled else str(value)


def make_axis(axis: AxisType, text: str, items: list[str] | None = None) -> Axis:
    """An axis and its values text (or, for a dropdown axis, its list ``items``) -> Axis (values
    expanded; seeds of -1 drawn now, as A1111 does)."""
    if axis.label == "Nothing":
        return Axis(axis, ("",))
    if axis.apply is None:
        raise InvalidRequest("axis", f"the A1111 axis {axis.label!r} is not available in danqing; available: "
                                     f"{', '.join(supported_labels())}")
    if items is not None:
        values = [str(v).strip() for v in items]
        text = ", ".join(values)
    else:
        values = parse_values(text, axis.kind, field=axis.label)
    if not values:
        raise InvalidRequest(axis.label, "the axis has no values")
    if axis.label in ("Seed", "Var. seed"):
        values = [random.randint(0, MAX_SEED - 1000) if v == -1 else v for v in values]
    return Axis(axis, tuple(values), text.strip())


def parse_axis_option(spec: str) -> Axis:
    """The CLI's ``--x "Steps: 4,8,12"``: an axis name, a colon, its values."""
    name, sep, text = spec.partition(":")
    if not sep:
        raise InvalidRequest("axis", f"{spec[:120]!r}: write AXIS: VALUES, e.g. \"Steps: 4,8,12\" or "
                                     f"\"Prompt S/R: red, blue\"")
    return make_axis(find_axis(name), text)


NOTHING = Axis(AXES[0], ("",))


@dataclass
class Cell:
    """One picture of the plot: its indices along X, Y, Z and its request."""

    ix: int
    iy: int
    iz: int
    request: GenerationRequest
    extra: dict = field(default_factory=dict)


@dataclass
class XYZPlan:
    base: GenerationRequest
    axes: tuple[Axis, Axis, Axis]
    cells: list[Cell]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a.values) for a in self.axes)

    def grid_params(self) -> dict[str, str]:
        """A1111's grid infotext pairs: ``Script``, ``X Type``, ``X Values``, ..."""
        p = {"Script": "X/Y/Z plot"}
        for name, a in zip("XYZ", self.axes):
            if a.type.label != "Nothing":
                p[f"{name} Type"], p[f"{name} Values"] = a.type.label, a.values_text
        return p


def plan_xyz(base: GenerationRequest, x: Axis, y: Axis = NOTHING, z: Axis = NOTHING, *,
             max_cells: int = DEFAULT_MAX_CELLS, prompting: Prompting | None = None,
             fixed_seed: bool = True, vary_seeds: tuple[bool, bool, bool] = (False, False, False),
             dynamic: bool = True) -> XYZPlan:
    """Every cell's request, validated before anything runs.

    Args:
        base: the request every cell starts from.
        x, y, z: the axes (``NOTHING`` for an unused one).
        max_cells: refuse plots with more cells, saying how many.
        prompting: styles (for the Styles axis) and wildcards (with ``dynamic``, a dynamic prompt
            is drawn per cell with the cell's seed); None = neither.
        fixed_seed: draw a random base seed (-1) once for every cell (A1111's default).
        vary_seeds: add the X (Y, Z) index to the seed (A1111's "Vary seeds for X").
    """
    nx, ny, nz = (len(a.values) for a in (x, y, z))
    count = nx * ny * nz
    if count > max_cells:
        raise InvalidRequest("xyz", f"the plot has {nx} x {ny} x {nz} = {count} cells, more than the limit of "
                                    f"{max_cells}; use fewer values")
    if fixed_seed and base.seed == -1:
        base = base.replace(seed=random.randint(0, MAX_SEED - 1000))
    styles = prompting.styles if prompting is not None else {}
    cells = []
    for iz, zv in enumerate(z.values):
        for iy, yv in enumerate(y.values):
            for ix, xv in enumerate(x.values):
                f = base.model_dump()
                for axis, v in ((x, xv), (y, yv), (z, zv)):
                    axis.type.apply(f, v, list(axis.values), {"styles": styles})
                if f["seed"] != -1:
                    f["seed"] += (ix if vary_seeds[0] else 0) + (iy * nx if vary_seeds[1] else 0) + \
                        (iz * nx * ny if vary_seeds[2] else 0)
                request = GenerationRequest.create(**f)
                extra: dict = {}
                if prompting is not None and dynamic:
                    request, extra = expand_request(request, prompting)
                cells.append(Cell(ix, iy, iz, request, extra))
    return XYZPlan(base, (x, y, z), cells)


@dataclass
class XYZResult:
    plan: XYZPlan
    images: list[Image.Image]
    infotexts: list[str]
    grids: list[Image.Image]
    grid_infotexts: list[str]
    paths: list[Path] = field(default_factory=list)
    grid_paths: list[Path] = field(default_factory=list)

    def combined_grid(self) -> Image.Image:
        """The Z grids side by side (A1111's first picture)."""
        return hstack(self.grids)


def run_xyz(studio, plan: XYZPlan, out_dir: Path | None = None, *, on_cell: Callable | None = None,
            save: bool = False, legend: bool = True) -> XYZResult:
    """Generate every cell (one picture each: the first of its batch), then the grids.

    Args:
        studio: a Studio, or anything with its ``generate`` (the server's queued one).
        out_dir: when given, each cell is written as ``cell-zZ-yY-xX.png`` and each grid as
            ``grid-zZ.png`` (never over an existing file).
        on_cell: called with (index, count) after each cell.
        save: ask ``studio`` to save each cell itself (its own outputs folder).
        legend: draw the axis labels (A1111's "Draw legend").
    """
    images, infotexts = [], []
    paths = []
    for i, cell in enumerate(plan.cells):
        kwargs = {"extra_params": cell.extra} if cell.extra else {}
        result = studio.generate(cell.request, save=save, **kwargs)
        images.append(result.images[0])
        infotexts.append(result.infotexts[0])
        if out_dir is not None:
            paths.append(save_png(result.images[0], Path(out_dir) / f"cell-z{cell.iz}-y{cell.iy}-x{cell.ix}.png",
                                  result.infotexts[0]))
        if on_cell is not None:
            on_cell(i + 1, len(plan.cells))
    grids, grid_texts, grid_paths = [], [], []
    x, y, z = plan.axes
    nx, ny, _ = plan.shape
    for iz, zv in enumerate(z.values):
        block = images[iz * nx * ny:(iz + 1) * nx * ny]
        labels = ([x.label(v) for v in x.values], [y.label(v) for v in y.values], z.label(zv)) if legend else \
            ([""] * nx, [""] * len(y.values), "")
        grid = draw_grid(block, labels[0], labels[1], title=labels[2])
        text = add_params(infotexts[iz * nx * ny], plan.grid_params())
        grids.append(grid)
        grid_texts.append(text)
        if out_dir is not None:
            grid_paths.append(save_png(grid, Path(out_dir) / f"grid-z{iz}.png", text))
    return XYZResult(plan, images, infotexts, grids, grid_texts, paths, grid_paths)


def add_params(infotext: str, params: dict[str, str]) -> str:
    """An infotext with more ``key: value`` pairs on its parameter line."""
    prompt, negative, old = parse_infotext(infotext)
    version = old.pop("Version", None)
    return format_infotext(prompt, negative, {**old, **params, "Version": version})


# -- drawing ---------------------------------------------------------------------------------------
def _font(texts: list[str], size: int):
    try:
        return ImageFont.truetype(choose_font("".join(texts) or "A"), size)
    except (InvalidRequest, OSError):
        return ImageFont.load_default(size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def draw_grid(images: list[Image.Image], col_labels: list[str], row_labels: list[str], *, title: str = "") -> Image.Image:
    """Cells in rows (one per row label) and columns, with the column labels above, the row
    labels on the left and ``title`` on top (A1111's ``draw_grid_annotations``, simplified):
    black text on white, in DejaVu Sans or a CJK font when the labels need one."""
    cols, rows = max(1, len(col_labels)), max(1, len(row_labels))
    cw, ch = max(i.width for i in images), max(i.height for i in images)
    size = max(12, min(ch // 6, 32))
    font = _font(col_labels + row_labels + [title], size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = size + size // 3
    col_lines = [_wrap(probe, t, font, cw - 4) for t in col_labels]
    top = (max(len(c) for c in col_lines) * line_h + size // 2) if any(col_labels) else 0
    left = int(max((probe.textlength(t, font=font) for t in row_labels), default=0)) + size if any(row_labels) else 0
    head = (line_h + size // 2) if title else 0
    grid = Image.new("RGB", (left + cols * cw, head + top + rows * ch), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((left + cols * cw // 2, size // 4), title, fill="black", font=font, anchor="ma")
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img.convert("RGB"), (left + c * cw + (cw - img.width) // 2, head + top + r * ch + (ch - img.height) // 2))
    for c, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            draw.text((left + c * cw + cw // 2, head + size // 4 + k * line_h), line, fill="black", font=font, anchor="ma")
    for r, text in enumerate(row_labels):
        draw.text((left - size // 2, head + top + r * ch + ch // 2), text, fill="black", font=font, anchor="rm")
    return grid


def hstack(images: list[Image.Image]) -> Image.Image:
    if len(images) == 1:
        return images[0]
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for img in images:
        out.paste(img, (x, 0))
        x += img.width
    return out
