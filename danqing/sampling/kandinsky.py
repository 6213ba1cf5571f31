"""Kandinsky 2.2 in our loop: the prior (text -> CLIP image embedding), then the decoder
(image embedding -> MoVQ latents -> pixels); variations take a picture's embedding instead.

Both run the one loop (``loop.sample``): the prior with ``PriorDenoise`` as its model call and
its ``UnCLIPScheduler`` told each step's previous timestep (``PrevTimestep``), the decoder with
``ImageEmbedDenoise`` (CFG on the noise half, the text branch's variance kept, as
``sampling.cascade.PixelDenoise``) and its DDPM scheduler. The schedulers are the folders' own
(the request's sampler is not read).

As diffusers' ``KandinskyV22PriorPipeline`` and ``KandinskyV22Pipeline`` (parity is a test):
with a negative prompt the prior samples the prompt's and the negative prompt's embeddings in
one batch (both with the negative prompt as CFG's unconditional text) and the negative one is
the decoder's unconditional embedding; without one the unconditional text is "" and the
decoder's unconditional embedding is the image encoder's embedding of a black picture. Image i
draws from generator ``seed + i``: the prior's start noise (prompt, then negative), its step
noise, then the decoder's start and step noise. Variations (``run_kandinsky(..., picture=...)``)
skip the prior.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from danqing.decode import to_pil
from danqing.sampling.loop import Conditioning, ConditioningSchedule, OnStep, sample
from danqing.sampling.noise import initial_noise, make_generators

KANDINSKY_DEFAULTS = {"prior_steps": 25, "prior_cfg_scale": 4.0, "steps": 100, "cfg_scale": 4.0}  # the pipelines'


def _scheduler(config: dict, default: str):
    import diffusers

    return getattr(diffusers, config.get("_class_name", default)).from_config(config)


class PrevTimestep:
    """A scheduler whose ``step`` is told the next timestep of its schedule (``UnCLIPScheduler``
    otherwise steps to t - 1, as the prior pipeline does not let it)."""

    def __init__(self, scheduler, generator):
        self._s, self._generator = scheduler, generator

    def __getattr__(self, name):
        return getattr(self._s, name)

    def step(self, out, t, x, generator=None, return_dict=False):
        ts = self._s.timesteps
        i = int((ts == t).nonzero()[0])
        prev = ts[i + 1] if i + 1 < len(ts) else None
        return self._s.step(out, t, x, prev_timestep=prev, generator=self._generator, return_dict=return_dict)


@dataclass
class PriorDenoise:
    """The prior's model call: ``proj`` (2R, P) pooled text, ``hidden`` (2R, T, D), ``mask`` (2R, T)."""

    proj: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor

    def __call__(self, prior, x, t, cond, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        out = prior(x_in, timestep=t, proj_embedding=self.proj, encoder_hidden_states=self.hidden,
                    attention_mask=self.mask).predicted_image_embedding
        if not use_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + cfg_scale * (text - uncond)


@dataclass
class ImageEmbedDenoise:
    """The decoder's model call: ``embeds`` (2B or B, E) [negative; image] embeddings."""

    embeds: torch.Tensor
    learned: bool = False

    def __call__(self, unet, x, t, cond, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
        channels = x.shape[1]
        x_in = torch.cat([x, x]) if use_cfg else x
        out = unet(x_in, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": self.embeds},
                   return_dict=False)[0]
        if use_cfg:
            uncond, text = out.chunk(2)
            eps_u, eps_c = uncond[:, :channels], text[:, :channels]
            out = torch.cat([eps_u + cfg_scale * (eps_c - eps_u), text[:, channels:]], dim=1)
        return out if self.learned else out[:, :channels]


@torch.no_grad()
def _text(prior, texts: list[str]):
    tokens = prior.tokenizer(texts, padding="max_length", max_length=prior.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    device = prior.text_encoder.device
    out = prior.text_encoder(tokens.input_ids.to(device))
    return out.text_embeds, out.last_hidden_state, tokens.attention_mask.bool().to(device)


@torch.no_grad()
def picture_embedding(prior, picture: Image.Image | None) -> torch.Tensor:
    """(1, E) CLIP image embedding of a picture; None: of a black picture at the encoder's size
    (the decoder's unconditional embedding, as ``KandinskyV22PriorPipeline.get_zero_embed``)."""
    enc = prior.image_encoder
    if picture is None:
        size = enc.config.image_size
        pixels = torch.zeros(1, 3, size, size)
    else:
        pixels = prior.image_processor(picture.convert("RGB"), return_tensors="pt").pixel_values
    return enc(pixels.to(device=enc.device, dtype=enc.dtype)).image_embeds


@torch.no_grad()
def run_prior(prior, prompt: str, negative: str, batch: int, gens, *, steps: int, cfg_scale: float,
              on_step: OnStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, E) image embeddings of the prompt and (B, E) negative ones (see the module's doc)."""
    texts = [prompt] * batch + ([negative] * batch if negative else [])
    rows = len(texts)
    use_cfg = cfg_scale > 1.0
    proj, hidden, mask = _text(prior, texts)
    if use_cfg:
        u_proj, u_hidden, u_mask = _text(prior, [negative] * rows)
        proj, hidden, mask = torch.cat([u_proj, proj]), torch.cat([u_hidden, hidden]), torch.cat([u_mask, mask])
    dim = prior.prior.config.embedding_dim
    # one generator: all rows from it in order; several: prompt row i and negative row i from gen i
    row_gens = gens[0] if len(gens) == 1 else [gens[i % batch] for i in range(rows)]
    if len(gens) == 1:
        noise = torch.randn((rows, dim), generator=gens[0], device=gens[0].device)
    else:
        noise = torch.cat([torch.randn((1, dim), generator=g, device=g.device) for g in row_gens])
    scheduler = PrevTimestep(_scheduler(prior.scheduler_config, "UnCLIPScheduler"), row_gens)
    schedule = ConditioningSchedule([steps], [Conditioning(hidden)])  # read by PriorDenoise, not here
    result = sample(prior.prior, scheduler, noise.to(proj), schedule, steps=steps, cfg_scale=cfg_scale,
                    on_step=on_step, family="kandinsky-prior", denoise_fn=PriorDenoise(proj, hidden, mask))
    embeds = prior.prior.post_process_latents(result.latents)
    if negative:
        return embeds[:batch], embeds[batch:]
    return embeds, picture_embedding(prior, None).repeat(batch, 1)


@dataclass
class KandinskyResult:
    """What ``run_kandinsky`` made: decoder latents (B, 4, h, w), pictures, seeds, the embeddings."""

    latents: torch.Tensor
    images: list[Image.Image]
    seeds: list[int]
    image_embeds: torch.Tensor
    interrupted: bool = False
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def run_kandinsky(prior, decoder, request, *, picture: Image.Image | None = None, prior_steps: int | None = None,
                  prior_cfg_scale: float | None = None, on_step: OnStep | None = None,
                  device: str | torch.device = "cpu") -> KandinskyResult:
    """Text -> prior -> decoder, or with ``picture`` its variations (decoder only).

    Args:
        prior: ``models.unclip_models.KandinskyPrior`` (its image encoder serves variations too).
        decoder: ``models.unclip_models.KandinskyDecoder``.
        request: a ``GenerationRequest``: prompt, negative prompt, steps and CFG scale (of the
            decoder), seed, size, batch size.
        prior_steps, prior_cfg_scale: the prior's (default 25, 4.0).
    """
    B = request.batch_size
    seeds = [request.seed + i for i in range(B)]
    gens = make_generators(seeds, "cpu" if getattr(request, "rng", "cpu") == "cpu" else device)
    if picture is not None:
        embeds = picture_embedding(prior, picture).repeat(B, 1)
        negative = picture_embedding(prior, None).repeat(B, 1)
    else:
        embeds, negative = run_prior(
            prior, request.prompt, request.negative_prompt, B, gens,
            steps=prior_steps or KANDINSKY_DEFAULTS["prior_steps"], on_step=on_step,
            cfg_scale=KANDINSKY_DEFAULTS["prior_cfg_scale"] if prior_cfg_scale is None else prior_cfg_scale)
    unet = decoder.unet
    use_cfg = request.cfg_scale > 1.0
    both = (torch.cat([negative, embeds]) if use_cfg else embeds).to(device, unet.dtype)
    f = 2 ** (len(decoder.movq.config.block_out_channels) - 1)
    h, w = (-(-side // f ** 2) * f for side in (request.height, request.width))  # the pipeline's rounding
    noise = initial_noise((unet.config.in_channels, h, w), gens).to(device, unet.dtype)
    learned = decoder.scheduler_config.get("variance_type") in ("learned", "learned_range")
    schedule = ConditioningSchedule([request.steps], [Conditioning(both)])  # read by ImageEmbedDenoise
    result = sample(unet, _scheduler(decoder.scheduler_config, "DDPMScheduler"), noise, schedule, steps=request.steps,
                    cfg_scale=request.cfg_scale, generators=gens, on_step=on_step, family="kandinsky",
                    denoise_fn=ImageEmbedDenoise(both, learned))
    pixels = decoder.movq.decode(result.latents.to(decoder.movq.dtype), force_not_quantize=True).sample
    images = to_pil((pixels.float().cpu() * 0.5 + 0.5).clamp(0, 1))
    return KandinskyResult(result.latents, images, seeds, embeds, result.interrupted)
