"""Regional prompting as the A1111 extension Regional Prompter (hako-mikan) writes it: the canvas
cut into regions, each with its own prompt, attended separately in every cross-attention layer.

The syntax (Regional Prompter's "Attention" mode, "Matrix" and "Mask" divide modes):

- The prompt's parts are separated by ``BREAK`` (``ADDCOL`` / ``ADDROW`` read as ``BREAK``).
  With a base prompt (``use_base``, or ``ADDBASE`` after the first part) the first part is the
  base, attended everywhere and mixed into each region by its base ratio. With a common prompt
  (``use_common``, or ``ADDCOMM`` after the first part) the first part is put in front of every
  other part (``"common, part"``); order: common, base, regions.
- ``ratios`` is the Divide Ratio: ``1,1`` two equal columns ("Columns"), ``1,2,1`` three; in
  "Rows" the same numbers cut rows. ``;`` makes two levels: in "Columns" each ``;``-group is a
  row whose first number is its height and the others its columns' widths (``1,2,1;2,1,1``);
  in "Rows" each ``,``-group is a column whose first number is its width and the others its
  rows' heights. Numbers are relative (``3,1,1`` = 60%, 20%, 20%).
- "Mask": one greyscale picture per region (white = the region) instead of ratios; where no
  mask covers the canvas the base prompt (with a base) or the first region takes it.
- The negative prompt is one text for every region, or as many ``BREAK`` parts as the prompt
  has (base included): then each region's negative is attended there too.

Regional Prompter repairs what it cannot read (a ratio that is not a number becomes 1, missing
regions repeat the last); danqing refuses it with one line instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from danqing.conditioning.prompt_parser import parse_attention, prompt_schedule
from danqing.conditioning.text import TextCond, pad_to_chunks
from danqing.errors import InvalidRequest
from danqing.pictures import load_mask

KEYWORDS = ("ADDCOMM", "ADDBASE", "ADDCOL", "ADDROW", "BREAK")
_SPLIT = re.compile(r"\b(ADDCOMM|ADDBASE|ADDCOL|ADDROW|BREAK)\b")
MAX_REGIONS = 16
_RATIO_HELP = ("write relative sizes such as 1,1 (two regions) or 1,2,1;2,1,1 (two levels: the first number "
               "of each ';' group is its size, the others its regions')")


class Regions(BaseModel):
    """A request's regions (Regional Prompter's settings; docs/prompts.md "Regional prompting").

    Args:
        mode: "Columns" (regions side by side), "Rows" (stacked) or "Mask" (``masks``).
        ratios: the Divide Ratio (``1,1``, ``1,2,1``, ``1,2,1;2,1,1``).
        base_ratios: how much of the base prompt each region takes: one number for all, or one
            per region (``0.2`` or ``0.2,0.4``), each 0-1. Used with a base prompt only.
        use_base: the prompt's first part is the base prompt (also when it has ``ADDBASE``).
        use_common: the first part is put in front of every other (also with ``ADDCOMM``).
        use_common_negative: the same for the negative prompt.
        masks: "Mask" mode: one picture per region, white = the region.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["Columns", "Rows", "Mask"] = "Columns"
    ratios: str = "1,1"
    base_ratios: str = "0.2"
    use_base: bool = False
    use_common: bool = False
    use_common_negative: bool = False
    masks: tuple[str, ...] = ()

    @field_validator("base_ratios")
    @classmethod
    def _base(cls, v: str) -> str:
        parse_base_ratios(v)
        return v

    @model_validator(mode="after")
    def _layout(self) -> "Regions":
        if self.mode == "Mask":
            if not self.masks:
                raise InvalidRequest("regions.masks", "the Mask mode needs one mask picture per region")
            if len(self.masks) > MAX_REGIONS or any(not m.strip() for m in self.masks):
                raise InvalidRequest("regions.masks", f"1 to {MAX_REGIONS} picture paths, none empty")
        else:
            if self.masks:
                raise InvalidRequest("regions.masks", f"mask pictures are for the Mask mode; mode is {self.mode}")
            parse_ratios(self.ratios, self.mode)
        return self

    @property
    def count(self) -> int:
        """The number of regions (base excluded)."""
        return len(self.masks) if self.mode == "Mask" else len(parse_ratios(self.ratios, self.mode))


# ---------------------------------------------------------------------------------------------
# Ratios -> cells -> masks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One region as fractions of the canvas: rows ``y0..y1``, columns ``x0..x1``."""

    y0: float
    y1: float
    x0: float
    x1: float


def _numbers(text: str, sep: str) -> list[float]:
    out = []
    for item in text.split(sep):
        try:
            v = float(item)
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and v > 0):
            raise InvalidRequest("regions.ratios", f"{item.strip()!r} is not a positive number; {_RATIO_HELP}")
        out.append(v)
    return out


def _spans(sizes: list[float]) -> list[tuple[float, float]]:
    """Relative sizes -> consecutive (start, end) fractions of 1 (the last ends at exactly 1)."""
    total, acc, out = sum(sizes), 0.0, []
    for i, s in enumerate(sizes):
        end = 1.0 if i == len(sizes) - 1 else (acc + s) / total
        out.append((acc / total if i else 0.0, end))
        acc += s
    return out


def parse_ratios(text: str, mode: str = "Columns") -> list[Cell]:
    """Regional Prompter's Divide Ratio -> the regions' cells, in prompt order (Regional
    Prompter's ``split_l2`` / ``matrixdealer``): "Columns" goes row by row, left to right in
    each; "Rows" column by column, top to bottom in each.

    Args:
        text: ``1,1`` / ``1,2,1;2,1,1`` (see the module docstring).
        mode: "Columns" or "Rows".
    """
    text = text.strip()
    if not text:
        raise InvalidRequest("regions.ratios", f"is empty; {_RATIO_HELP}")
    outer_sep, inner_sep = (";", ",") if mode == "Columns" else (",", ";")
    if ";" not in text:  # one level: the whole canvas cut along one axis
        groups = [(1.0, _numbers(text, ","))]
    else:
        groups = []
        for group in text.split(outer_sep):
            nums = _numbers(group, inner_sep)
            groups.append((nums[0], nums[1:] or [1.0]))
    cells = []
    for (o0, o1), (_, inner) in zip(_spans([g[0] for g in groups]), groups):
        for i0, i1 in _spans(inner):
            cells.append(Cell(o0, o1, i0, i1) if mode == "Columns" else Cell(i0, i1, o0, o1))
    if len(cells) > MAX_REGIONS:
        raise InvalidRequest("regions.ratios", f"makes {len(cells)} regions; at most {MAX_REGIONS}")
    return cells


def parse_base_ratios(text: str) -> list[float]:
    """``0.2`` or ``0.2,0.3,...``: each between 0 and 1."""
    out = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            v = float("nan")
        if not 0.0 <= v <= 1.0:
            raise InvalidRequest("regions.base_ratios", f"{item.strip()!r} is not a number between 0 and 1; give one "
                                 "ratio for every region (0.2) or one per region (0.2,0.5)")
        out.append(v)
    return out


def _edges(n: int, spans: list[tuple[float, float]]) -> list[tuple[int, int]]:
    # floor of the fractions, the last edge at n (Regional Prompter: int(d * start):int(d * end))
    return [(int(n * a + 1e-9), n if b >= 1.0 else int(n * b + 1e-9)) for a, b in spans]


def cell_masks(cells: list[Cell], height: int, width: int) -> torch.Tensor:
    """(R, height, width) 0/1 masks of ``cells`` on a ``height`` x ``width`` grid; cells that
    tile the canvas give a partition (every position in exactly one region)."""
    out = torch.zeros(len(cells), height, width)
    ys = _edges(height, [(c.y0, c.y1) for c in cells])
    xs = _edges(width, [(c.x0, c.x1) for c in cells])
    for i, ((a, b), (c, d)) in enumerate(zip(ys, xs)):
        out[i, a:b, c:d] = 1.0
    return out


def load_masks(paths: tuple[str, ...], width: int, height: int) -> torch.Tensor:
    """The Mask mode's pictures as (R, height, width) values in 0..1 (each resized to the
    picture's size, as Regional Prompter's "just resize")."""
    out = []
    for i, path in enumerate(paths):
        m = load_mask(path, f"regions.masks.{i}")
        if m.size != (width, height):
            m = m.resize((width, height), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0))
    return torch.stack(out)


def slice_weights(masks: torch.Tensor, *, base: list[float] | None) -> torch.Tensor:
    """How much each attended prompt counts at each position: (S, h, w), summing to 1 everywhere.

    Regional Prompter's blend: a region's output is ``(1 - b) * region + b * base``; positions no
    mask covers take the base (with a base prompt) or the first region. Overlapping masks share.

    Args:
        masks: (R, h, w) region masks in 0..1.
        base: the base ratio of each region, or None without a base prompt (then S = R, else
            S = R + 1 with the base first).
    """
    total = masks.sum(0)
    masks = masks / total.clamp(min=1.0)  # overlaps share
    rest = (1.0 - masks.sum(0)).clamp(min=0.0)
    if base is None:
        masks = masks.clone()
        masks[0] = masks[0] + rest
        return masks
    b = torch.tensor(base, dtype=masks.dtype).view(-1, 1, 1)
    return torch.cat([(rest + (masks * b).sum(0))[None], masks * (1 - b)])


# ---------------------------------------------------------------------------------------------
# Prompts -> parts
# ---------------------------------------------------------------------------------------------
def _split(text: str) -> tuple[list[str], list[str]]:
    pieces = _SPLIT.split(text)
    return [p.strip() for p in pieces[::2]], pieces[1::2]


def prompt_parts(prompt: str, regions: Regions, *, field: str = "prompt") -> tuple[list[str], bool]:
    """The texts attended separately, base first when there is one, the common part already
    put in front of each; and whether there is a base.

    Raises:
        InvalidRequest: ``ADDCOMM`` / ``ADDBASE`` not where they belong, or a part count that
            does not match the regions.
    """
    parts, keys = _split(prompt)
    use_common = regions.use_common or "ADDCOMM" in keys
    use_base = regions.use_base or "ADDBASE" in keys
    expected = ["ADDCOMM"] * use_common + ["ADDBASE"] * use_base
    for i, key in enumerate(keys):
        if key in ("ADDCOMM", "ADDBASE") and (i >= len(expected) or expected[i] != key):
            raise InvalidRequest(field, f"{key} must come right after the {'common' if key == 'ADDCOMM' else 'base'} "
                                 "prompt, at the start (order: common ADDCOMM base ADDBASE regions)")
    if use_common:
        common, parts = parts[0], parts[1:]
        parts = [f"{common}, {p}" if p else common for p in parts]
    n = regions.count + use_base
    if len(parts) != n:
        what = f"{regions.count} region{'s' * (regions.count != 1)}" + (" and a base prompt" if use_base else "")
        layout = f"masks: {len(regions.masks)}" if regions.mode == "Mask" else f"ratios {regions.ratios!r}"
        raise InvalidRequest(field, f"has {len(parts)} part{'s' * (len(parts) != 1)} separated by BREAK but the "
                             f"{layout} ({regions.mode}) make {what}: give {n} parts")
    return parts, use_base


def negative_parts(negative: str, regions: Regions, n: int) -> list[str]:
    """The negative prompt's parts: one for every region, or ``n`` (one per attended prompt)."""
    parts, keys = _split(negative)
    if regions.use_common_negative or "ADDCOMM" in keys:
        if len(parts) > 1:
            common, parts = parts[0], parts[1:]
            parts = [f"{common}, {p}" if p else common for p in parts]
    if len(parts) not in (1, n):
        raise InvalidRequest("negative_prompt", f"has {len(parts)} parts separated by BREAK; give one (for every "
                             f"region) or {n} (one per part of the prompt)")
    return parts


def check_request(prompt: str, negative: str, regions: Regions, field: str = "prompt") -> None:
    """Request validation: the prompt's and the negative prompt's parts match the regions."""
    parts, use_base = prompt_parts(prompt, regions, field=field)
    negs = negative_parts(negative, regions, len(parts))
    for name, texts in ((field, parts), ("negative_prompt", negs)):
        for i, text in enumerate(texts):
            try:  # a part must be a prompt on its own (a BREAK inside brackets cuts them)
                for _, t in prompt_schedule(text, 1):
                    parse_attention(t)
            except ValueError as exc:
                raise InvalidRequest(name, f"part {i + 1} ({text!r}): {exc}") from None
    if use_base:
        base = parse_base_ratios(regions.base_ratios)
        if len(base) not in (1, regions.count):
            raise InvalidRequest("regions.base_ratios", f"has {len(base)} ratios; give one, or one per region "
                                 f"({regions.count})")


# ---------------------------------------------------------------------------------------------
# Conditioning and the attention plan
# ---------------------------------------------------------------------------------------------
def regional_conditioning(prompt: str, negative: str, regions: Regions, *, use_cfg: bool,
                          schedule: Callable[[str], list[tuple[int, str]]],
                          encode: Callable[[str, bool], TextCond]) -> tuple[list, list]:
    """Every attended prompt encoded along its own prompt-editing schedule, padded to one chunk
    count and concatenated along the tokens: the UNet's context is (B, S * n * 77, D), slice s
    for attended prompt s (the base first). A single negative is repeated S times (its rows
    attend only the first slice, ``RegionalAttnProcessor``).

    Args:
        schedule: text -> [(end step, text at that step)] (``request_schedule``).
        encode: (text, negative) -> ``TextCond`` (cached by the caller).

    Returns:
        (positive, negative): [(end step, TextCond)] each, the format of ``build_conditioning``.
    """
    parts, _ = prompt_parts(prompt, regions)
    negs = negative_parts(negative, regions, len(parts)) if use_cfg else [""]
    pos = [[(end, encode(t, False)) for end, t in schedule(p)] for p in parts]
    neg = [[(end, encode(t, True)) for end, t in schedule(p)] for p in negs]
    n = max(c.n_chunks for seq in pos + neg for _, c in seq)
    pos = [[(e, pad_to_chunks(c, n, encode("", False))) for e, c in seq] for seq in pos]
    neg = [[(e, pad_to_chunks(c, n, encode("", True))) for e, c in seq] for seq in neg]
    if len(neg) == 1:
        neg = neg * len(pos)
    return _concat(pos), _concat(neg)


def _concat(seqs: list[list[tuple[int, TextCond]]]) -> list[tuple[int, TextCond]]:
    ends = sorted({e for seq in seqs for e, _ in seq})
    out = []
    for end in ends:
        conds = [next((c for e, c in seq if end <= e), seq[-1][1]) for seq in seqs]
        # SDXL's pooled embedding: the first part's (A1111 pools the prompt's first chunk)
        out.append((end, TextCond(torch.cat([c.hidden for c in conds], dim=1), conds[0].pooled)))
    return out


def _halve(n: int, k: int) -> int:
    for _ in range(k):
        n = (n + 1) // 2  # a stride-2 convolution with padding 1: ceil(n / 2)
    return n


@dataclass
class RegionPlan:
    """What the attention processor needs for one request (made per request, never shared).

    Attributes:
        slices: S, the number of attended prompts (base included).
        regional_negative: the negative prompt has a part per slice (else its rows attend slice 0).
        use_cfg: the UNet's batch is [uncond; cond] (CFG), else all rows are conditional.
        sizes: the (height, width) in pixels of the passes (the request's, and hires fix's).
        weight_fn: (h, w) -> (S, h, w) weights of the slices on an h x w grid.
    """

    slices: int
    regional_negative: bool
    use_cfg: bool
    sizes: list[tuple[int, int]]
    weight_fn: Callable[[int, int], torch.Tensor]

    def __post_init__(self):
        self._cache: dict = {}

    def grid(self, tokens: int) -> tuple[int, int]:
        """The (h, w) of an attention layer with ``tokens`` positions (Regional Prompter's
        ``split_dims``: the picture's size halved, rounding up, until it fits)."""
        for height, width in self.sizes:
            for k in range(12):
                h, w = _halve(height, k), _halve(width, k)
                if h * w == tokens:
                    return h, w
        raise InvalidRequest("regions", f"cannot place {tokens} attention positions on a {self.sizes[0][1]}x"
                             f"{self.sizes[0][0]} picture")

    def weights(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """(S, 1, tokens, 1) weights of the slices for a layer of ``tokens`` positions."""
        key = (tokens, like.device, like.dtype)
        if key not in self._cache:
            h, w = self.grid(tokens)
            self._cache[key] = self.weight_fn(h, w).reshape(self.slices, 1, h * w, 1).to(like)
        return self._cache[key]


def region_plan(request) -> RegionPlan:
    """The ``RegionPlan`` of a request with ``regions`` (mask pictures read here)."""
    regions: Regions = request.regions
    parts, use_base = prompt_parts(request.prompt, regions)
    negs = negative_parts(request.negative_prompt, regions, len(parts))
    base = None
    if use_base:
        base = parse_base_ratios(regions.base_ratios)
        base = base * regions.count if len(base) == 1 else base
    sizes = [(request.height, request.width)]
    if request.enable_hr:
        w, h = request.hr_size
        sizes.append((h, w))
    if regions.mode == "Mask":
        full = load_masks(regions.masks, request.width, request.height)

        def weight_fn(h: int, w: int) -> torch.Tensor:
            small = torch.nn.functional.interpolate(full[None], size=(h, w), mode="area")[0]
            return slice_weights(small, base=base)
    else:
        cells = parse_ratios(regions.ratios, regions.mode)

        def weight_fn(h: int, w: int) -> torch.Tensor:
            return slice_weights(cell_masks(cells, h, w), base=base)

    return RegionPlan(len(parts), len(negs) > 1, request.cfg_scale > 1.0, sizes, weight_fn)


# ---------------------------------------------------------------------------------------------
# Infotext (Regional Prompter's keys)
# ---------------------------------------------------------------------------------------------
def region_params(regions: Regions | None) -> dict:
    """Infotext entries, as Regional Prompter writes them ("RP Active: True, RP Divide mode:
    Matrix, RP Matrix submode: Columns, RP Ratios: "1,1", ..."); danqing adds "RP Masks"."""
    if regions is None:
        return {}
    p = {"RP Active": True, "RP Divide mode": "Mask" if regions.mode == "Mask" else "Matrix",
         "RP Matrix submode": regions.mode if regions.mode != "Mask" else None, "RP Calc Mode": "Attention",
         "RP Ratios": regions.ratios if regions.mode != "Mask" else None, "RP Base Ratios": regions.base_ratios,
         "RP Use Base": regions.use_base, "RP Use Common": regions.use_common,
         "RP Use Ncommon": regions.use_common_negative,
         "RP Masks": "|".join(regions.masks) or None}
    return {k: v for k, v in p.items() if v is not None}


_LEGACY_SUBMODES = {"Horizontal": "Columns", "Vertical": "Rows"}


def region_fields(params: dict) -> dict:
    """The inverse of ``region_params`` (Regional Prompter's own infotexts too); {} when the
    regions are off."""
    if str(params.get("RP Active", "")).lower() != "true":
        return {}
    divide = params.get("RP Divide mode", "Matrix")
    if divide not in ("Matrix", "Mask"):
        raise InvalidRequest("regions.mode", f"Regional Prompter's {divide!r} mode is not available; danqing has "
                             "Matrix (Columns, Rows) and Mask")
    if params.get("RP Calc Mode", "Attention") != "Attention":
        raise InvalidRequest("regions", "Regional Prompter's Latent mode is not available; danqing has Attention")
    sub = params.get("RP Matrix submode", "Columns")
    flag = lambda key: str(params.get(key, "False")).lower() == "true"  # noqa: E731
    f = {"mode": "Mask" if divide == "Mask" else _LEGACY_SUBMODES.get(sub, sub),
         "use_base": flag("RP Use Base"), "use_common": flag("RP Use Common"),
         "use_common_negative": flag("RP Use Ncommon")}
    if divide == "Mask":
        f["masks"] = tuple(p for p in params.get("RP Masks", "").split("|") if p)
    elif params.get("RP Ratios"):
        f["ratios"] = params["RP Ratios"]
    if params.get("RP Base Ratios"):
        f["base_ratios"] = params["RP Base Ratios"]
    return {"regions": f}
