"""Extra-network cards of the web UI (A1111's LoRA and Textual Inversion cards): each installed
LoRA and embedding as a card with its name, a preview picture when a PNG sits beside the file
(``NAME.png`` or ``NAME.preview.png``, A1111's names) and its trigger words; clicking a card adds
it to the txt2img prompt (``ui_common.add_network``: ``<lora:NAME:1>``, an embedding's name)."""

# No ``from __future__ import annotations``: Gradio reads the handlers' annotations (a card's
# ``gr.SelectData``) at run time, and ``gr`` here is a parameter, not a global it could look up.
import json
from dataclasses import dataclass
from pathlib import Path

from danqing.models.names import inside
from danqing.server.ui_common import add_network
from danqing.server.ui_i18n import t

KINDS = ("lora", "embedding")
PREVIEW_SUFFIXES = (".png", ".preview.png")
TOP_TAGS = 3  # trigger words read from a kohya LoRA's tag counts


@dataclass(frozen=True)
class Card:
    kind: str
    name: str
    preview: Path | None
    triggers: tuple[str, ...]


def _stem(path: Path) -> Path:
    return path.with_suffix("") if path.is_file() else path


def preview_of(path: Path, folder: Path) -> Path | None:
    """The PNG beside a model file (``NAME.png`` or ``NAME.preview.png``) inside its folder."""
    for suffix in PREVIEW_SUFFIXES:
        p = _stem(path).with_name(_stem(path).name + suffix)
        if p.is_file() and inside(p, folder):
            return p
    return None


def trigger_words(path: Path) -> tuple[str, ...]:
    """A LoRA's trigger words: A1111's ``NAME.json`` sidecar ("activation text"), else the
    safetensors metadata (``modelspec.trigger_phrase``, else kohya's most frequent caption tags)."""
    sidecar = _stem(path).with_suffix(".json")
    if sidecar.is_file():
        try:
            text = json.loads(sidecar.read_text(encoding="utf-8")).get("activation text", "")
        except (OSError, ValueError, AttributeError):
            text = ""
        if text.strip():
            return tuple(w.strip() for w in text.split(",") if w.strip())
    if path.suffix != ".safetensors" or not path.is_file():
        return ()
    from safetensors import safe_open  # reads the header only

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 -- a damaged file has no trigger words; loading it says why
        return ()
    if meta.get("modelspec.trigger_phrase"):
        return tuple(w.strip() for w in meta["modelspec.trigger_phrase"].split(",") if w.strip())
    try:
        freq = json.loads(meta.get("ss_tag_frequency", "{}"))
    except ValueError:
        return ()
    counts: dict[str, int] = {}
    for tags in freq.values() if isinstance(freq, dict) else ():
        for tag, n in (tags.items() if isinstance(tags, dict) else ()):
            counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    return tuple(sorted(counts, key=lambda k: (-counts[k], k))[:TOP_TAGS])


def network_cards(registry, kind: str) -> list[Card]:
    """The cards of the installed LoRAs or embeddings, in the registry's order."""
    folder = registry.folder(kind)
    cards = []
    for e in registry.scan(kind):
        if e.path is None:
            continue
        triggers = trigger_words(e.path) if kind == "lora" else (e.name,)
        cards.append(Card(kind, e.name, preview_of(e.path, folder), triggers))
    return cards


def insert_card(prompt: str, card: Card) -> str:
    """The prompt with a clicked card: a LoRA's tag and its trigger words, or an embedding's name."""
    prompt = add_network(prompt or "", card.kind, card.name)
    for word in card.triggers if card.kind == "lora" else ():
        if word not in prompt:
            prompt = f"{prompt}, {word}" if prompt.strip() else word
    return prompt


def cards_panel(gr, state, prompt) -> None:
    """An accordion of card galleries (one per kind) whose clicks add to ``prompt``."""
    from PIL import Image

    blank = Image.new("RGB", (64, 64), (200, 200, 200))

    def items(cards):
        return [(Image.open(c.preview).convert("RGB") if c.preview else blank,  # the models folder is not served
                  f"{c.name}" + (f" · {', '.join(c.triggers)}" if c.kind == "lora"
                                                                        and c.triggers else "")) for c in cards]

    with gr.Accordion(t("Extra networks"), open=False, elem_id="extra_networks"):
        refresh = gr.Button(t("Refresh"), scale=0, elem_id="extra_networks_refresh")
        galleries = {}
        for kind, label in (("lora", t("LoRA")), ("embedding", t("Textual Inversion"))):
            galleries[kind] = gr.Gallery(items(network_cards(state.registry, kind)), label=label, columns=6,
                                         height="auto", allow_preview=False, elem_id=f"cards_{kind}")

            def picked(text, evt: gr.SelectData, kind=kind):
                cards = network_cards(state.registry, kind)
                return insert_card(text, cards[evt.index]) if evt.index < len(cards) else text

            galleries[kind].select(picked, inputs=[prompt], outputs=[prompt])
    refresh.click(lambda: tuple(items(network_cards(state.registry, k)) for k in KINDS),
                  outputs=[galleries[k] for k in KINDS])
