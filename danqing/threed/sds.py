"""Score distillation sampling (DreamFusion, Poole et al. 2022, eq. 3) against a frozen model.

For rendered latents z = E(g(theta)), a timestep t and noise eps:

    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    grad_z L_SDS = w(t) (eps_hat(z_t; y, t) - eps),     w(t) = 1 - abar_t

where eps_hat is the model's classifier-free-guided prediction with a high guidance scale. The
UNet is not differentiated: the gradient is injected through ``sds_loss``, whose derivative
with respect to z is exactly that vector, and flows on through the VAE encoder and the renderer
into the field. The model call is danqing's own ``denoise`` (UNet + CFG, sampling/loop.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from danqing.conditioning.schedule import sdxl_time_ids
from danqing.conditioning.text import TextEncoder, pad_to_chunks
from danqing.decode import vae_scale_factor
from danqing.sampling.loop import Conditioning, denoise
from danqing.threed.cameras import table, view_prompt

VIEWS = ("front", "side", "back", "overhead")


def native_size(comps) -> int:
    """The side of the pictures a model draws: the UNet's sample size times the VAE's factor."""
    return comps.unet.config.sample_size * vae_scale_factor(comps.vae)


def sds_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w(t) = 1 - abar_t (DreamFusion's choice: the noise variance sigma_t^2)."""
    return 1 - alphas_cumprod[t]


def sds_gradient(unet, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: Conditioning,
                 guidance: float, alphas_cumprod: torch.Tensor, *, prediction_type: str = "epsilon",
                 denoise_fn=denoise) -> torch.Tensor:
    """w(t) (eps_hat - eps) for (B, 4, h, w) clean ``latents`` (no gradient is taken through the model).

    Args:
        unet: the frozen diffusers UNet.
        t: a 0-dim integer timestep tensor (one for the batch).
        noise: eps, shaped as ``latents``.
        cond: [uncond; cond] conditioning for CFG (``Conditioning``).
        guidance: the CFG scale (DreamFusion uses 100).
        alphas_cumprod: (T,) abar of the model's training schedule, on the latents' device.
        prediction_type: "epsilon", or "v_prediction" (converted: eps = sqrt(abar) v + sqrt(1 - abar) z_t).
    """
    abar = alphas_cumprod[t].to(latents.dtype)
    with torch.no_grad():
        z_t = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise
        out = denoise_fn(unet, z_t.to(unet.dtype), t, cond, guidance, True).to(latents.dtype)
        eps_hat = abar.sqrt() * out + (1 - abar).sqrt() * z_t if prediction_type == "v_prediction" else out
    return sds_weight(alphas_cumprod, t).to(latents.dtype) * (eps_hat - noise)


def sds_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to ``latents`` is ``grad``:
    0.5 |z - (z - g)|^2 summed, with (z - g) held constant."""
    target = (latents - grad).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum")


def timestep_bounds(step: int, steps: int, n_train: int) -> tuple[int, int]:
    """[t_min, t_max] in training timesteps at ``step`` of ``steps``: t_max falls linearly from
    the table's ``t_max`` to ``t_max_end`` over the run (timestep annealing)."""
    s = table()["sds"]
    frac = step / max(steps - 1, 1)
    hi = s["t_max"] + (s["t_max_end"] - s["t_max"]) * frac
    return int(s["t_min"] * n_train), max(int(hi * n_train), int(s["t_min"] * n_train) + 1)


class Guide:
    """A frozen model as the critic of rendered views: its conditioning per view, encoding of
    renders to latents, and the SDS loss of one view.

    Args:
        comps: loaded ``Components`` (read-only; the UNet and VAE stay in their dtype).
        prompt, negative: the prompts; with ``view_prompts`` the prompt gets DreamFusion's view
            suffixes ("..., front view"), one conditioning per view, each encoded once.
        guidance: the CFG scale.
    """

    def __init__(self, comps, prompt: str, negative: str = "", *, guidance: float = 100.0, view_prompts: bool = True):
        from diffusers import DDPMScheduler

        self.comps = comps
        self.guidance = guidance
        unet = comps.unet
        self.device = unet.device
        self.native = native_size(comps)
        encoder = TextEncoder(comps)
        texts = {v: view_prompt(prompt, v) for v in VIEWS} if view_prompts else {v: prompt for v in VIEWS}
        with torch.no_grad():
            neg = encoder.encode(negative, negative=True)
            pos = {v: encoder.encode(text) for v, text in texts.items()}
            chunks = max([neg.n_chunks] + [c.n_chunks for c in pos.values()])
            empty, empty_neg = encoder.encode(""), encoder.encode("", negative=True)
            neg = pad_to_chunks(neg, chunks, empty_neg)
            self.conds = {v: self._conditioning(neg, pad_to_chunks(c, chunks, empty)) for v, c in pos.items()}
        sched = DDPMScheduler.from_config(comps.scheduler_config)
        self.n_train = sched.config.num_train_timesteps
        self.alphas_cumprod = sched.alphas_cumprod.to(self.device, torch.float32)

    def _conditioning(self, neg, pos) -> Conditioning:
        context = torch.cat([neg.hidden, pos.hidden])  # (2, 77 * chunks, D): [uncond; cond]
        added = None
        if self.comps.family in ("sdxl", "sdxl-refiner"):
            added = {"text_embeds": torch.cat([neg.pooled, pos.pooled]),
                     "time_ids": sdxl_time_ids(self.comps.family, self.native, self.native, 1, use_cfg=True,
                                               dtype=pos.hidden.dtype, device=pos.hidden.device)}
        return Conditioning(context, added)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) render in [0, 1] -> (1, 4, h, w) scaled latents, differentiable; resized
        to the model's own picture size first (as stable-dreamfusion does for 512x512 SD)."""
        vae = self.comps.vae
        if image.shape[-1] != self.native:
            image = F.interpolate(image, size=(self.native, self.native), mode="bilinear", align_corners=False)
        x = (image * 2 - 1).to(self.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean
        if getattr(vae.config, "shift_factor", None):
            z = z - vae.config.shift_factor
        return z.float() * vae.config.scaling_factor

    def loss(self, image: torch.Tensor, view: str, t: int, noise: torch.Tensor) -> torch.Tensor:
        """The SDS loss of one rendered view at timestep ``t`` with ``noise`` (shaped as its latents)."""
        latents = self.encode(image)
        grad = sds_gradient(self.comps.unet, latents, torch.tensor(t, device=self.device), noise.to(latents),
                            self.conds[view], self.guidance, self.alphas_cumprod,
                            prediction_type=self.comps.prediction_type)
        grad = torch.nan_to_num(grad)
        return sds_loss(latents, grad)

    def latent_shape(self) -> tuple[int, int, int]:
        f = vae_scale_factor(self.comps.vae)
        return (self.comps.unet.config.in_channels, self.native // f, self.native // f)
