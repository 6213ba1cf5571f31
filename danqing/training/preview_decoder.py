"""A tiny preview decoder (TAESD architecture) distilled from a model's VAE decoder.

The student sees the latents as the sampler has them (posterior mean x scaling factor) of
pictures of the synthetic worlds and learns the VAE decoder's picture of them (L1 + MSE), as
TAESD's decoder was distilled from SD's. Only the decoder is trained and written, in TAESD's own
single-file layout (``models.preview_decoder``), so the file is the same kind a user installs for
SD or SDXL.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from danqing.files import atomic_write_bytes
from danqing.models.loader import load_components
from danqing.models.preview_decoder import TINY_CONFIG, build_tiny_decoder
from danqing.models.registry import Registry
from danqing.settings import Settings
from danqing.training.base import encode_all
from danqing.training.data import synthetic_dataset


def diffusers_to_taesd(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``decoder.layers.{N}.…`` -> TAESD's ``{N+1}.…`` (index 0 is TAESD's clamp)."""
    out = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            n, rest = key[len("decoder.layers."):].split(".", 1)
            out[f"{int(n) + 1}.{rest}"] = value.contiguous()
    return out


@torch.no_grad()
def _targets(vae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The VAE decoder's pictures (N, 3, H, W) in [-1, 1] of sampler-space latents."""
    out = [vae.decode(latents[i:i + batch] / vae.config.scaling_factor).sample.clamp(-1, 1)
           for i in range(0, latents.shape[0], batch)]
    return torch.cat(out)


def train_preview_decoder(model: str, out: Path, *, steps: int = 3000, batch_size: int = 32, lr: float = 1e-3,
                          n_images: int = 4000, n_test: int = 256, seed: int = 0, settings: Settings | None = None,
                          log: Callable[[str], None] = print) -> dict:
    """Distil a tiny decoder for ``model``'s latents; writes ``out`` (a TAESD decoder .safetensors).

    Returns a summary: steps, the last loss, and the PSNR (dB) on ``n_test`` held-out pictures of
    the student against the VAE decoder and of the linear preview (``decode.cheap_preview``).
    """
    from safetensors.torch import save

    from danqing.decode import cheap_preview

    settings = settings or Settings.from_env()
    entry = Registry(settings.models_dir).find("checkpoint", model)
    comps = load_components(entry)
    vae = comps.vae.float().eval()
    t = time.perf_counter()
    data = synthetic_dataset(n_images + n_test, 64, seed, 1, world="mix")
    mean, _ = encode_all(vae, data.images, "cpu")
    latents = mean * vae.config.scaling_factor
    targets = _targets(vae, latents)
    log(f"data: {n_images} + {n_test} held-out pictures, latents and VAE decodes ({time.perf_counter() - t:.1f} s)")
    train_z, train_x, test_z, test_x = latents[:n_images], targets[:n_images], latents[n_images:], targets[n_images:]

    torch.manual_seed(seed)
    student = build_tiny_decoder(latent_channels=latents.shape[1], **TINY_CONFIG)
    opt = torch.optim.Adam(student.decoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    t, loss_avg = time.perf_counter(), None
    for step in range(steps):
        idx = torch.randint(n_images, (batch_size,), generator=g)
        pred = student.decoder(train_z[idx])
        err = pred - train_x[idx]
        loss = err.abs().mean() + (err ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps} loss {loss_avg:.4f} {(step + 1) / (time.perf_counter() - t):.1f} it/s")

    student.eval()
    with torch.no_grad():
        pred = student.decoder(test_z).clamp(-1, 1)
    linear = torch.stack([torch.from_numpy(np.array(cheap_preview(z[None], comps.family)))
                          for z in test_z]).permute(0, 3, 1, 2).float() / 127.5 - 1
    linear = F.interpolate(linear, size=test_x.shape[-2:], mode="nearest")
    summary = {"model": model, "steps": steps, "loss": round(loss_avg, 4),
               "psnr_db": round(_psnr(pred, test_x), 2), "linear_preview_psnr_db": round(_psnr(linear, test_x), 2),
               "params": sum(p.numel() for p in student.decoder.parameters())}
    state = diffusers_to_taesd({k: v.half() for k, v in student.state_dict().items()})
    atomic_write_bytes(Path(out), save(state, metadata={"danqing.preview_decoder": str(summary)}))
    log(f"wrote {out}: {summary}")
    return summary


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of pictures in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a - b) ** 2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()
