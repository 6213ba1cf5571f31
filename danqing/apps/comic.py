"""The comic (the course's first project): a storyboard -> one picture per panel with the same
character -> a laid-out page (PNG pages, a PDF and a CBZ).

The workflow is the course's: a draft pass at the base size and a contact sheet to review,
re-rolling single panels (their seeds are kept in the project file), then the final pass with
hires fix and the page layout (grid, gutters, borders, captions and speech bubbles, reading
order left-to-right or right-to-left; CJK text through an installed CJK font).

A project folder holds everything a page is made of: ``storyboard.toml`` (a copy of the
storyboard), ``project.json`` (every panel's seed and prompt), ``draft/panel-NN.png`` and
``final/panel-NN.png`` (each with its infotext: ``generate --from`` re-creates it),
``contact-sheet.png``, ``page-N.png``, ``comic.pdf``, ``comic.cbz`` and ``layout.json``.
Running the same command on the same project gives the same files, bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from danqing.apps.comic_expand import check_expand, expand
from danqing.errors import DanqingError, InvalidRequest
from danqing.files import atomic_write_bytes, atomic_write_text
from danqing.outputs.store import atomic_save_image, save_png
from danqing.request import GenerationRequest

PANEL_SEED_STEP = 1_000  # a re-roll moves a panel's seed by this much
OnPanel = Callable[[int, int, Path], "bool | None"]  # (panels done, panels to do, its file) -> False: stop
_MENTION = re.compile(r"\{(\w+)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Character(_Strict):
    """A character: the words that draw it (``trigger``), its LoRA tags / embeddings (``tags``)."""

    trigger: str
    tags: str = ""
    description: str = ""


class Bubble(_Strict):
    """A speech bubble: its text and where its middle sits (fractions of the panel)."""

    text: str
    x: float = Field(0.5, ge=0, le=1)
    y: float = Field(0.2, ge=0, le=1)


class Panel(_Strict):
    """One panel: a scene line (``{name}`` places a character's trigger words), the characters
    in it, a caption, speech bubbles, a seed (None: the storyboard's seed + the panel's index)
    and request fields of its own (``overrides``)."""

    scene: str
    characters: list[str] = []
    caption: str = ""
    bubbles: list[Bubble] = []
    seed: int | None = None
    overrides: dict = {}


class Layout(_Strict):
    columns: int = Field(3, ge=1, le=8)
    gutter: int = Field(12, ge=0, le=200)          # pixels between panels and around the page
    border: int = Field(3, ge=0, le=50)            # panel border width
    direction: Literal["ltr", "rtl"] = "ltr"       # reading order: rtl for manga
    caption_size: int = Field(14, ge=6, le=200)    # caption text height in pixels
    panels_per_page: int = Field(6, ge=1, le=64)


class Storyboard(_Strict):
    """The storyboard file (TOML). Request defaults apply to every panel; ``hires_*`` to the
    final pass (A1111's hires fix) only."""

    title: str = ""
    model: str | None = None
    sampler: str = "DPM++ 2S a"
    schedule: str = "Karras"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 64
    height: int = 64
    seed: int = 0
    prefix: str = ""
    negative_prompt: str = ""
    hires_scale: float = 2.0
    hires_steps: int = 10
    hires_denoising: float = 0.5
    hires_upscaler: str = "Latent"
    expand: str | None = None  # prompt expansion of the scene lines: "rules" or "lm:FOLDER" (comic_expand.py)
    characters: dict[str, Character] = {}
    panels: list[Panel] = Field(min_length=1, max_length=64)
    layout: Layout = Layout()

    @field_validator("expand")
    @classmethod
    def _expand(cls, v):
        return check_expand(v)

    @model_validator(mode="after")
    def _known_characters(self):
        for i, p in enumerate(self.panels, 1):
            for name in [*p.characters, *_MENTION.findall(p.scene)]:
                if name not in self.characters:
                    known = ", ".join(self.characters) or "none"
                    raise ValueError(f"panel {i} names the unknown character {name!r}; characters: {known}")
        return self


# -- reading ---------------------------------------------------------------------------------------
def read_storyboard(path: str | Path) -> Storyboard:
    """A storyboard: TOML, or a plain text file of one scene line per panel (English or Chinese).

    Raises:
        InvalidRequest: the file, the line (TOML) or the field, and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest("storyboard", f"{path}: no such file")
    return parse_storyboard(path.read_text(encoding="utf-8"), str(path), toml=path.suffix == ".toml")


def parse_storyboard(text: str, where: str = "storyboard", *, toml: bool = True) -> Storyboard:
    """A storyboard from its text (``where`` names it in errors: a file, or the API's field).

    Raises:
        InvalidRequest: ``where``, the line (TOML) or the field, and what was expected.
    """
    try:
        if toml:
            data = tomllib.loads(text)
        else:
            data = {"panels": [{"scene": line.strip()} for line in text.splitlines() if line.strip()]}
        return Storyboard(**data)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest("storyboard", f"{where}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "file"
        raise InvalidRequest("storyboard", f"{where}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None


def scene_text(story: Storyboard, panel: Panel) -> str:
    """The scene line with each ``{name}`` replaced by that character's trigger words."""
    return _MENTION.sub(lambda m: story.characters[m.group(1)].trigger, panel.scene)


def panel_prompt(story: Storyboard, panel: Panel, scene: str | None = None) -> str:
    """prefix, the scene line (``scene``: as expanded, else ``scene_text``), and the tags of every
    character in the panel."""
    scene = scene_text(story, panel) if scene is None else scene
    names = dict.fromkeys([*_MENTION.findall(panel.scene), *panel.characters])
    tags = " ".join(story.characters[n].tags for n in names if story.characters[n].tags)
    return ", ".join(part for part in (story.prefix.strip(), scene.strip(), tags) if part)


def panel_request(story: Storyboard, index: int, seed: int, *, final: bool, scene: str | None = None) -> GenerationRequest:
    """Panel ``index`` (0-based) as a request: the draft at the base size, the final with hires
    fix (``scene``: the expanded scene line, when the storyboard expands them)."""
    panel = story.panels[index]
    fields = dict(prompt=panel_prompt(story, panel, scene), negative_prompt=story.negative_prompt, model=story.model,
                  sampler=story.sampler, schedule=story.schedule, steps=story.steps, cfg_scale=story.cfg_scale,
                  width=story.width, height=story.height, seed=seed)
    if final and story.hires_scale > 1:
        fields.update(enable_hr=True, hr_scale=story.hires_scale, hr_second_pass_steps=story.hires_steps,
                      denoising_strength=story.hires_denoising, hr_upscaler=story.hires_upscaler)
    try:
        return GenerationRequest.create(**{**fields, **panel.overrides})
    except (ValidationError, DanqingError) as exc:
        raise InvalidRequest(f"panels[{index}]", str(exc).splitlines()[0]) from None


# -- the project folder ---------------------------------------------------------------------------
class ComicProject:
    """A storyboard and its project folder (created on the first draft)."""

    def __init__(self, storyboard: str | Path, folder: str | Path | None = None):
        self.source = Path(storyboard)
        self.story = read_storyboard(self.source)
        self.folder = Path(folder) if folder else self.source.with_suffix("")
        self.state_path = self.folder / "project.json"
        self._expanded: dict[tuple[int, int], str] = {}  # (panel, seed) -> its expanded scene line

    def seeds(self) -> list[int]:
        """Every panel's seed: the project file's (re-rolls kept), else the panel's, else the
        storyboard's seed + the panel's index."""
        kept = self._state().get("seeds", [])
        out = []
        for i, p in enumerate(self.story.panels):
            out.append(kept[i] if i < len(kept) else (p.seed if p.seed is not None else self.story.seed + i))
        return out

    def scene(self, studio, index: int, seed: int) -> str:
        """Panel ``index``'s scene line, expanded as the storyboard's ``expand`` says."""
        key = (index, seed)
        if self.story.expand is None:
            return scene_text(self.story, self.story.panels[index])
        if key not in self._expanded:
            reg = studio.registry
            self._expanded[key] = expand(self.story.expand, scene_text(self.story, self.story.panels[index]), seed,
                                         base_dir=self.source.parent, models_dir=reg.models_dir,
                                         names_only=reg.names_only)
        return self._expanded[key]

    def _save_state(self, seeds: list[int], studio) -> None:
        prompts = [panel_prompt(self.story, p, self.scene(studio, i, seeds[i]) if self.story.expand else None)
                   for i, p in enumerate(self.story.panels)]  # first: a failing expansion writes nothing
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "storyboard.toml" if self.source.suffix == ".toml" else
                          self.folder / "storyboard.txt", self.source.read_text(encoding="utf-8"), overwrite=True)
        state = {"title": self.story.title, "seeds": seeds, "prompts": prompts, "expand": self.story.expand,
                 "drafts": self._state().get("drafts", {})}
        atomic_write_text(self.state_path, json.dumps(state, ensure_ascii=False, indent=2), overwrite=True)

    def _render(self, studio, index: int, seed: int, *, final: bool) -> Path:
        request = panel_request(self.story, index, seed, final=final, scene=self.scene(studio, index, seed))
        path = self.folder / ("final" if final else "draft") / f"panel-{index + 1:02d}.png"
        draft = self.folder / "draft" / path.name
        drawn = self._state().get("drafts", {})
        if final and drawn.get(str(index)) == _fingerprint(request) and draft.is_file():
            # no hires pass: the final panel is the draft, which was drawn from this very request
            return atomic_write_bytes(path, draft.read_bytes(), overwrite=True)
        result = studio.generate(request)
        saved = save_png(result.images[0], path, result.infotexts[0], overwrite=True)
        if not final:
            state = self._state()
            state.setdefault("drafts", {})[str(index)] = _fingerprint(request)
            atomic_write_text(self.state_path, json.dumps(state, ensure_ascii=False, indent=2), overwrite=True)
        return saved

    def _state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def draft(self, studio, panels: list[int] | None = None, on_panel: OnPanel | None = None) -> Path:
        """The draft pass (all panels, or the 1-based ``panels``) and the contact sheet.

        Args:
            on_panel: called with (panels done, panels to do, the panel's file) after each panel;
                False from it stops the pass there (the panels drawn so far are kept).
        """
        seeds = self.seeds()
        self._save_state(seeds, studio)
        todo = self._indices(panels)
        for k, i in enumerate(todo, 1):
            path = self._render(studio, i, seeds[i], final=False)
            if on_panel is not None and on_panel(k, len(todo), path) is False:
                break
        return self.contact_sheet()

    def reroll(self, studio, panel: int, on_panel: OnPanel | None = None) -> Path:
        """A new seed for one panel (kept in the project file), its draft drawn again."""
        (i,) = self._indices([panel])
        seeds = self.seeds()
        seeds[i] += PANEL_SEED_STEP
        self._save_state(seeds, studio)
        path = self._render(studio, i, seeds[i], final=False)
        if on_panel is not None:
            on_panel(1, 1, path)
        return self.contact_sheet()

    def render(self, studio, on_panel: OnPanel | None = None) -> list[Path]:
        """The final pass (hires fix) of every panel, then the pages, the PDF and the CBZ (none
        when ``on_panel`` stopped the pass: the final panels drawn so far are kept)."""
        seeds = self.seeds()
        self._save_state(seeds, studio)
        panels = []
        for i, s in enumerate(seeds):
            path = self._render(studio, i, s, final=True)
            panels.append(Image.open(path).convert("RGB"))
            if on_panel is not None and on_panel(i + 1, len(seeds), path) is False:
                return []
        return self.write_pages(panels)

    def _indices(self, panels: list[int] | None) -> list[int]:
        n = len(self.story.panels)
        if panels is None:
            return list(range(n))
        bad = [p for p in panels if not 1 <= p <= n]
        if bad:
            raise InvalidRequest("panel", f"{bad[0]}: the storyboard has panels 1-{n}")
        return [p - 1 for p in panels]

    def contact_sheet(self) -> Path:
        """The drafts in a grid, numbered, for review (a missing draft is a grey box)."""
        size = (self.story.width, self.story.height)
        pics = []
        for i in range(len(self.story.panels)):
            p = self.folder / "draft" / f"panel-{i + 1:02d}.png"
            pics.append(Image.open(p).convert("RGB") if p.is_file() else Image.new("RGB", size, (128, 128, 128)))
        layout = Layout(columns=min(6, len(pics)), gutter=4, border=1, caption_size=12, panels_per_page=len(pics))
        sheet = layout_page(pics, [str(i + 1) for i in range(len(pics))], [[] for _ in pics], layout)
        return atomic_save_image(sheet, self.folder / "contact-sheet.png", overwrite=True)

    def write_pages(self, panels: list[Image.Image]) -> list[Path]:
        lay = self.story.layout
        pages, paths = [], []
        for start in range(0, len(panels), lay.panels_per_page):
            chunk = range(start, min(start + lay.panels_per_page, len(panels)))
            page = layout_page([panels[i] for i in chunk], [self.story.panels[i].caption for i in chunk],
                               [self.story.panels[i].bubbles for i in chunk], lay)
            pages.append(page)
            paths.append(atomic_save_image(page, self.folder / f"page-{len(pages)}.png", overwrite=True))
        pdf = io.BytesIO()
        pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=72.0,
                      title=self.story.title or "danqing comic", creationDate=_EPOCH, modDate=_EPOCH)
        paths.append(atomic_write_bytes(self.folder / "comic.pdf", pdf.getvalue(), overwrite=True))
        cbz = io.BytesIO()
        with zipfile.ZipFile(cbz, "w", zipfile.ZIP_STORED) as z:
            for k, p in enumerate(paths[:len(pages)], 1):
                info = zipfile.ZipInfo(f"page-{k:03d}.png", date_time=(1980, 1, 1, 0, 0, 0))
                z.writestr(info, p.read_bytes())
        paths.append(atomic_write_bytes(self.folder / "comic.cbz", cbz.getvalue(), overwrite=True))
        layout_json = {"pages": len(pages), **lay.model_dump(), "panel_size": list(panels[0].size)}
        atomic_write_text(self.folder / "layout.json", json.dumps(layout_json, indent=2), overwrite=True)
        return paths


def _fingerprint(request: GenerationRequest) -> str:
    """What a panel's picture was drawn from (``project.json``'s ``drafts``)."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()[:16]


_EPOCH = time.gmtime(946_684_800)  # 2000-01-01, fixed PDF dates: the same project, the same bytes


# -- the page --------------------------------------------------------------------------------------
def _font(size: int, text: str) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A CJK font when the text needs one (an installed one), else DejaVu Sans, else Pillow's own."""
    from danqing.apps.control_projects import cjk_fonts, find_font  # the creative-text font finders

    needs_cjk = any(ord(ch) > 0x2E80 for ch in text)
    candidates = cjk_fonts() if needs_cjk else []
    try:
        candidates = candidates + [find_font("DejaVuSans.ttf")]
    except InvalidRequest:
        pass
    for path in candidates:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def _bubble(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], bubble: Bubble, size: int) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    font = _font(size, bubble.text)
    l, t, r, b = draw.textbbox((0, 0), bubble.text, font=font)
    cx, cy = x0 + bubble.x * w, y0 + bubble.y * h
    rx, ry = (r - l) / 2 + size * 0.6, (b - t) / 2 + size * 0.45
    tail = [(cx - rx * 0.2, cy + ry * 0.8), (cx + rx * 0.15, cy + ry * 0.8), (cx - rx * 0.1, cy + ry + size * 0.8)]
    draw.polygon(tail, fill="white", outline="black")
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill="white", outline="black", width=max(1, size // 10))
    draw.text((cx - (r - l) / 2 - l, cy - (b - t) / 2 - t), bubble.text, font=font, fill="black")


def layout_page(panels: list[Image.Image], captions: list[str], bubbles: list[list[Bubble]],
                layout: Layout) -> Image.Image:
    """Panels in a grid (reading order ``layout.direction``), each with a border, its speech
    bubbles and, below it, its caption; a white page with ``layout.gutter`` around everything."""
    pw, ph = panels[0].size
    cols = min(layout.columns, len(panels))
    rows = -(-len(panels) // cols)
    cap = layout.caption_size + layout.caption_size // 2 if any(captions) else 0
    g, bw = layout.gutter, layout.border
    page = Image.new("RGB", (g + cols * (pw + 2 * bw + g), g + rows * (ph + 2 * bw + cap + g)), "white")
    draw = ImageDraw.Draw(page)
    for i, pic in enumerate(panels):
        r, c = divmod(i, cols)
        if layout.direction == "rtl":
            c = cols - 1 - c
        x, y = g + c * (pw + 2 * bw + g), g + r * (ph + 2 * bw + cap + g)
        if bw:
            draw.rectangle((x, y, x + pw + 2 * bw - 1, y + ph + 2 * bw - 1), fill="black")
        page.paste(pic.resize((pw, ph), Image.LANCZOS) if pic.size != (pw, ph) else pic, (x + bw, y + bw))
        for b in bubbles[i]:
            _bubble(draw, (x + bw, y + bw, x + bw + pw, y + bw + ph), b, max(8, ph // 10))
        if captions[i]:
            font = _font(layout.caption_size, captions[i])
            l, t, rr, bb = draw.textbbox((0, 0), captions[i], font=font)
            draw.text((x + bw + (pw - (rr - l)) / 2 - l, y + ph + 2 * bw + (cap - (bb - t)) / 2 - t), captions[i],
                      font=font, fill="black")
    return page
