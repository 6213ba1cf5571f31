"""Tiny preview decoders (the TAESD architecture): a picture from the latents at every step for
a few milliseconds, where the model's own VAE takes far longer.

Files are diffusers ``AutoencoderTiny`` folders or TAESD's own single decoder files
(``taesd_decoder.safetensors`` / ``.pth`` as A1111 keeps them in ``models/VAE-taesd``: an
``nn.Sequential`` whose index 0 is the clamp, so key ``N.…`` is diffusers' ``decoder.layers.{N-1}.…``).
They live in the models folder's ``vae-taesd/``; which file serves which family is the table
``FILES`` (TAESD's own names), and danqing-tiny's is bundled (``data/models/vae-taesd/``,
trained by ``danqing train preview-decoder``, docs/training.md).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

from danqing.errors import CorruptModel

FOLDER = "vae-taesd"
FILES = {  # family -> file stems TAESD ships for its latent space, first found wins
    "sd1": ("taesd_decoder", "taesd"),
    "sd2": ("taesd_decoder", "taesd"),
    "sdxl": ("taesdxl_decoder", "taesdxl"),
    "sd3": ("taesd3_decoder", "taesd3"),
    "flux": ("taef1_decoder", "taef1"),
    "danqing-tiny": ("taesd-danqing-tiny",),
}
BUNDLED = "taesd-danqing-tiny"
# live preview methods (A1111's option ``show_progress_type``): the linear approximation of the
# VAE (microseconds) or TAESD (a few milliseconds, much closer to the VAE's picture)
PREVIEW_MODES = ("Approx cheap", "TAESD")
# danqing-tiny's latents are 4x smaller than its pictures (two upsamplings, not TAESD's three)
TINY_CONFIG = dict(encoder_block_out_channels=(32, 32, 32), decoder_block_out_channels=(32, 32, 32),
                   num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))
_LAYER = re.compile(r"^(\d+)\.(.+)$")


def latent_space(comps) -> str:
    """Whose latent space a model's VAE makes (the key of ``FILES``): danqing-tiny's, whose latents
    are 4x smaller than the picture, or else the family's (SD's VAEs all make 8x smaller ones)."""
    if 2 ** (len(comps.vae.config.block_out_channels) - 1) == 4:
        return "danqing-tiny"
    return comps.family.removesuffix("-refiner")


def build_tiny_decoder(**config):
    """A new ``AutoencoderTiny`` (random weights) of ``config`` (diffusers' defaults: TAESD's)."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(**config)


def taesd_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TAESD's decoder layout (``N.conv.0.weight``) -> diffusers' (``decoder.layers.{N-1}.…``)."""
    out = {}
    for key, value in state.items():
        m = _LAYER.match(key)
        if not m or int(m.group(1)) < 1:
            raise CorruptModel(f"not a TAESD decoder: unexpected key {key!r}")
        out[f"decoder.layers.{int(m.group(1)) - 1}.{m.group(2)}"] = value
    return out


def _config_from_decoder(state: dict[str, torch.Tensor]) -> dict:
    """The AutoencoderTiny config a TAESD decoder state dict (diffusers keys) was built with."""
    layers = sorted({int(k.split(".")[2]) for k in state})
    convs = [i for i in layers if f"decoder.layers.{i}.weight" in state]  # plain convs: first, upsample convs, last
    blocks, count = [], 0
    for i in layers:
        if f"decoder.layers.{i}.conv.0.weight" in state:
            count += 1
        elif i in convs[1:] and count:
            blocks.append(count)
            count = 0
    width = state[f"decoder.layers.{convs[0]}.weight"].shape[0]
    latent = state[f"decoder.layers.{convs[0]}.weight"].shape[1]
    n = len(blocks)
    return dict(latent_channels=latent, decoder_block_out_channels=(width,) * n, num_decoder_blocks=tuple(blocks),
                encoder_block_out_channels=(width,) * n, num_encoder_blocks=(1,) * n)


def load_tiny_decoder(path: str | Path):
    """An ``AutoencoderTiny`` (eval, fp32) from a diffusers folder or a TAESD decoder file.

    Raises:
        CorruptModel: a file that is neither (one line naming it).
    """
    from diffusers import AutoencoderTiny

    path = Path(path)
    if path.is_dir():
        return AutoencoderTiny.from_pretrained(path).eval()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("decoder.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("decoder.")}
    else:
        state = taesd_to_diffusers(state)
    try:
        model = build_tiny_decoder(**_config_from_decoder(state))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (KeyError, IndexError, RuntimeError) as exc:
        raise CorruptModel(f"{path.name}: not a TAESD decoder ({exc})") from exc
    if [k for k in missing if k.startswith("decoder.")] or unexpected:
        raise CorruptModel(f"{path.name}: not a TAESD decoder (missing {len(missing)}, unexpected {len(unexpected)})")
    return model.eval()


def bundled_decoder_path() -> Path:
    return Path(str(resources.files("danqing").joinpath(f"data/models/{FOLDER}/{BUNDLED}.safetensors")))


def find_tiny_decoder(models_dir: Path | None, space: str) -> Path | None:
    """The preview decoder for a latent space (``latent_space``): a file of ``FILES`` in
    ``models_dir/vae-taesd`` (or a folder of that name), else the bundled one for danqing-tiny."""
    stems = FILES.get(space, ())
    folder = Path(models_dir) / FOLDER if models_dir else None
    if folder is not None and folder.is_dir():
        for stem in stems:
            for p in sorted(folder.glob(f"{stem}*")):
                if p.stem == stem and (p.is_dir() or p.suffix in (".safetensors", ".pth", ".pt")):
                    return p
    bundled = bundled_decoder_path()
    if space == "danqing-tiny" and bundled.is_file():
        return bundled
    return None
