"""A CLIP model as danqing uses it: unit image and text features, and the CLIP score.

Any transformers ``CLIPModel`` folder works; danqing ships its own, ``danqing-tiny-clip``
(trained on the shapes world by ``danqing train clip``), in ``danqing/data/models/``. Its
tokenizer is OpenAI CLIP's BPE, built from the bundled vocabulary (``models.tokenizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from danqing.errors import CorruptModel, ModelNotFound

BUNDLED_CLIP = "danqing-tiny-clip"
# every CLIP model shipped in danqing/data/models/: the default, and the one the bundled
# IP-Adapter was trained with (its image encoder, named in the adapter file)
BUNDLED_CLIPS = (BUNDLED_CLIP, "danqing-tiny-clip-v1")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FOLDER = "clip"  # models/clip/<name>/: the user's CLIPModel folders


def projected(out) -> torch.Tensor:
    """The projected features of ``get_image_features`` / ``get_text_features`` (transformers
    5 returns them as the output's ``pooler_output``)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class ClipModel:
    """A ``CLIPModel`` (eval mode) and its tokenizer."""

    model: object
    tokenizer: object

    @property
    def size(self) -> int:
        return self.model.config.vision_config.image_size

    def _pixels(self, images) -> torch.Tensor:
        """uint8 (N, 3, S, S) tensors as they are; PIL pictures resized (bicubic) to the model's
        side after a centre crop to a square, as CLIP's processor does."""
        if isinstance(images, torch.Tensor):
            x = images.float() / 255
        else:
            arr = []
            for im in images:
                im = im.convert("RGB")
                w, h = im.size
                side = min(w, h)
                box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
                arr.append(np.asarray(im.crop(box).resize((self.size, self.size), 3)))
            x = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_features(self, images, batch: int = 256) -> torch.Tensor:
        """(N, D) unit features of pictures (PIL, or uint8 tensors (N, 3, H, W))."""
        x = self._pixels(images)
        out = [projected(self.model.get_image_features(pixel_values=x[i:i + batch])) for i in range(0, len(x), batch)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """(N, D) unit features of texts (truncated at 77 tokens, as the SD text encoders)."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return F.normalize(projected(self.model.get_text_features(input_ids=ids)).float(), dim=-1)

    def score(self, images, texts: list[str]) -> list[float]:
        """CLIP score of each picture against its text: 100 x the cosine of their features,
        clipped at 0 (Hessel et al. 2021, as torchmetrics' ``CLIPScore``)."""
        cos = (self.image_features(images) * self.text_features(texts)).sum(-1)
        return [round(100 * max(float(c), 0.0), 4) for c in cos]


def clip_folder(name: str, models_dir: Path | None = None) -> Path:
    """The folder of a CLIP model: a bundled one (``danqing-tiny-clip``; ``danqing-tiny-clip-v1``,
    the first one, the encoder of the documented unCLIP runs), a folder name under ``models/clip/``, or (CLI) a
    path to a ``CLIPModel`` folder."""
    if name in BUNDLED_CLIPS:
        bundled = Path(str(resources.files("danqing").joinpath(f"data/models/{name}")))
        if not (bundled / "config.json").is_file():
            raise ModelNotFound(f"{bundled}: the bundled {name} is missing (reinstall danqing)")
        return bundled
    p = Path(name)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if models_dir is not None and "/" not in name and "\\" not in name and name not in (".", ".."):
        here = Path(models_dir) / FOLDER / name
        if (here / "config.json").is_file():
            return here
    where = f"{Path(models_dir) / FOLDER}/" if models_dir is not None else "a folder"
    raise ModelNotFound(f"CLIP model {name!r} not found: give {BUNDLED_CLIP}, a CLIPModel folder in {where} or its path")


def load_clip(name: str = BUNDLED_CLIP, models_dir: Path | None = None) -> ClipModel:
    """A CLIP model on the CPU in float32 (see ``clip_folder`` for ``name``)."""
    from transformers import CLIPModel

    from danqing.models.tokenizer import clip_tokenizer

    folder = clip_folder(name, models_dir)
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CorruptModel(f"{folder}: cannot load a CLIPModel ({str(exc).splitlines()[0][:200]})") from None
    return ClipModel(model.eval().requires_grad_(False), clip_tokenizer())


__all__ = ["BUNDLED_CLIP", "BUNDLED_CLIPS", "CLIP_MEAN", "CLIP_STD", "ClipModel", "clip_folder", "load_clip", "projected"]
