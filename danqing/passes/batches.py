"""The batch loop every generation pass shares, and the one result type of a pass.

A request makes ``batch_count`` batches of ``batch_size`` images. Image i of batch b has the
seed ``seed + b * batch_size + i`` (and the subseed likewise), its own generator, and batch b
a fresh scheduler seeded with its seeds, so image i of a batch equals the single image of its
seed. A pass iterates ``Batches``, samples each batch and ``record``s it; the iteration stops
after a batch whose sampling was interrupted (the images reached so far are kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from PIL import Image

from danqing.decode import decode_latents, to_pil
from danqing.sampling.loop import SampleResult, sample
from danqing.sampling.noise import make_generators
from danqing.sampling.samplers import make_scheduler

# ``picture -> (picture, warnings)``: what finishes each generated picture (face restoration)
Finish = Callable[[Image.Image], "tuple[Image.Image, list[str]]"]


@dataclass
class PassResult:
    """What a pass produced, batch after batch.

    Attributes:
        latents: the final latents of each batch, (batch_size, C, h, w) each.
        seeds, subseeds: of each image (seed + i), the interrupted batch's included.
        interrupted: a callback stopped the run; the results show the state reached.
        images: the finished pictures; empty when the pass hands its latents on undecoded
            (txt2img before a refiner or hires pass).
        warnings: things the pass decided on its own (an empty mask, strength 0, ...), one line each.
        sources: Prompt-to-Prompt: the unedited picture of each image.
        inversion: Prompt-to-Prompt on a real picture: its ``NullTextInversion``.
    """

    latents: list[torch.Tensor] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    interrupted: bool = False
    images: list[Image.Image] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sources: list[Image.Image] = field(default_factory=list)
    inversion: object | None = None


@dataclass(frozen=True)
class Batch:
    """One batch of a request.

    Attributes:
        index, count: batch b of n (``StepInfo.batch_index`` / ``batch_count``).
        seeds, subseeds: of its images.
        generators: one per noise row: each seed's generator ``repeat`` times over.
        repeat: how many noise rows each image has (2 for Prompt-to-Prompt: a source and its edit).
    """

    index: int
    count: int
    seeds: list[int]
    subseeds: list[int]
    generators: list[torch.Generator]
    repeat: int = 1

    def scheduler(self, scheduler_config: dict, sampler: str, schedule: str, shift: float | None = None):
        """A fresh scheduler for this batch, seeded with its rows' seeds (stochastic samplers);
        ``shift``: a flow-matching model's timestep shift (None = the model's own)."""
        rows = self.seeds * self.repeat
        return make_scheduler(scheduler_config, sampler, schedule, seed=rows if len(rows) > 1 else rows[0], shift=shift)

    def sample(self, comps, noise: torch.Tensor, cond, *, sampler: str, schedule: str, steps: int, cfg_scale: float,
               on_step=None, scheduler=None, generators: list[torch.Generator] | None | str = "batch",
               shift: float | None = None, **loop) -> SampleResult:
        """``sampling.loop.sample`` for this batch on ``comps``' UNet.

        Args:
            noise: (rows, C, h, w) on the UNet's device and dtype.
            cond: the ``ConditioningSchedule``.
            scheduler: one made by ``self.scheduler`` already (default: a fresh one).
            generators: the loop's step generators: this batch's (default) or None.
            shift: a flow-matching model's timestep shift (None = the model's own).
            loop: the other arguments of ``sample`` (init latents, strength, mask, denoise_fn, ...).
        """
        scheduler = scheduler if scheduler is not None else self.scheduler(comps.scheduler_config, sampler, schedule,
                                                                           shift)
        return sample(comps.unet, scheduler, noise, cond, steps=steps, cfg_scale=cfg_scale,
                      generators=self.generators if generators == "batch" else generators, on_step=on_step,
                      family=comps.family, batch_index=self.index, batch_count=self.count, **loop)


class Batches:
    """The batches of ``request``, and the ``PassResult`` they add up to.

    Args:
        request: the ``GenerationRequest`` (seed, subseed, batch_size, batch_count, rng).
        device: where the UNet runs; noise is drawn there when ``request.rng`` is "gpu".
        count: number of batches (default ``request.batch_count``; a pass over an earlier
            pass's latents has one batch per latents tensor).
        repeat: noise rows per image (``Batch.repeat``).
    """

    def __init__(self, request, device, *, count: int | None = None, repeat: int = 1):
        self.request = request
        self.count = request.batch_count if count is None else count
        self.repeat = repeat
        self.noise_device = "cpu" if request.rng == "cpu" else device
        self.result = PassResult()

    def __iter__(self) -> Iterator[Batch]:
        size = self.request.batch_size
        for b in range(self.count):
            seeds = [self.request.seed + b * size + i for i in range(size)]
            subseeds = [self.request.subseed + b * size + i for i in range(size)]
            yield Batch(b, self.count, seeds, subseeds, make_generators(seeds * self.repeat, self.noise_device),
                        self.repeat)
            if self.result.interrupted:
                return

    def record(self, batch: Batch, sampled: SampleResult, *, latents: torch.Tensor | None = None,
               images: list[Image.Image] = ()) -> None:
        """Add a sampled batch: its latents (``sampled.latents`` unless given), seeds and pictures;
        an interrupted batch is the last one."""
        result = self.result
        result.latents.append(sampled.latents if latents is None else latents)
        result.seeds += batch.seeds
        result.subseeds += batch.subseeds
        result.images += list(images)
        result.interrupted = result.interrupted or sampled.interrupted


def finish_pictures(pictures: list[Image.Image], finish: Finish | None, warnings: list[str]) -> list[Image.Image]:
    """``finish`` (face restoration: A1111's ``restore_faces``) applied to each generated picture,
    its notes added once each to ``warnings``; the pictures unchanged when ``finish`` is None.
    Every pass finishes its pictures here, before anything is pasted over them."""
    if finish is None:
        return list(pictures)
    out = []
    for picture in pictures:
        picture, notes = finish(picture)
        warnings.extend(n for n in notes if n not in warnings)
        out.append(picture)
    return out


def decode_pictures(vae, latents: torch.Tensor, finish: Finish | None, warnings: list[str]) -> list[Image.Image]:
    """(B, C, h, w) latents -> B finished RGB pictures (``finish_pictures``)."""
    return finish_pictures(to_pil(decode_latents(vae, latents)), finish, warnings)
