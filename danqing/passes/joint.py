"""Joint txt2img: several compatible requests sampled as one UNet batch (batched serving).

Each request keeps what makes its pictures its own: its prompts (encoded alone, with its own
embeddings), its seeds (``Batches``: image i has seed + i and its own generator, the variation
seed slerped in as ``initial_noise`` does) and its steps' callbacks. The rows of all requests
are concatenated into one ``Batch`` -- the same machinery that makes image i of a
``batch_size`` > 1 request equal to the single image of its seed -- so every request's picture
equals its solo run up to the summation order of the batched UNet kernels
(``docs/benchmarks.md`` gives the measured difference).

What must be equal for requests to share a batch (model, size, sampler, steps, CFG scale, ...)
is decided by the caller (``danqing.server.batching.compat_key``); this pass checks only what
it cannot run: different text-context shapes (a prompt over 75 tokens beside a short one) are
split into separate UNet batches rather than padded, since padding would change the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from danqing.conditioning.schedule import ConditioningContext, build_conditioning
from danqing.decode import vae_scale_factor
from danqing.passes.batches import Batch, Batches, PassResult
from danqing.sampling.loop import Conditioning, ConditioningSchedule, StepControl, StepInfo
from danqing.sampling.noise import initial_noise


def merge_schedules(schedules: list[ConditioningSchedule], sizes: list[int], use_cfg: bool) -> ConditioningSchedule:
    """One ``ConditioningSchedule`` for the concatenated rows of several requests.

    A request's context is (2B_j, T, D) [uncond_j; cond_j] with CFG, else (B_j, T, D); the
    merged one is [uncond_1 .. uncond_n; cond_1 .. cond_n], so ``denoise``'s ``chunk(2)`` still
    splits it into the unconditional and conditional halves. Entry ends are the union of the
    requests' ends (prompt editing): between two consecutive ends every request's own entry is
    constant.

    Args:
        schedules: each request's schedule (``build_conditioning``), same T and D.
        sizes: each request's rows (its batch_size).
        use_cfg: whether the contexts carry the unconditional half.
    """
    ends = sorted({e for s in schedules for e in s.ends})
    conds = []
    for end in ends:
        parts = [s.at(end) for s in schedules]
        halves = 2 if use_cfg else 1
        context = torch.cat([c.context.split(b)[h] for h in range(halves) for c, b in zip(parts, sizes)])
        added = None
        if parts[0].added is not None:  # SDXL: pooled text embeddings and time ids, same layout
            added = {k: torch.cat([c.added[k].split(b)[h] for h in range(halves) for c, b in zip(parts, sizes)])
                     for k in parts[0].added}
        conds.append(Conditioning(context, added))
    return ConditioningSchedule(ends, conds)


@dataclass
class _Members:
    """Hands every request its own rows of each step (``StepInfo`` as in a solo run) and
    remembers where each request stopped: a request whose callback answers STOP or SKIP keeps
    its latents of that step; its rows go on being computed for the others until all stopped."""

    callbacks: list
    slices: list[slice]

    def __post_init__(self):
        self.ended: dict[int, tuple[torch.Tensor, bool, bool]] = {}  # j -> (latents, interrupted, skipped)

    def __call__(self, info: StepInfo):
        for j, (callback, rows) in enumerate(zip(self.callbacks, self.slices)):
            if j in self.ended or callback is None:
                continue
            mine = info.latents[rows]
            answer = callback(StepInfo(info.step, info.total, mine, info.family, 0, 1))
            if answer is StepControl.SKIP:
                self.ended[j] = (mine.clone(), False, True)
            elif answer is StepControl.STOP or answer is False:
                self.ended[j] = (mine.clone(), True, False)
        if len(self.ended) == len(self.callbacks):
            return StepControl.STOP
        return None


def run_txt2img_joint(comps, requests: list, *, device, dtype, contexts: list[ConditioningContext] | None = None,
                      on_steps: list | None = None) -> list[PassResult]:
    """``run_txt2img`` for several one-batch requests at once (undecoded latents, one
    ``PassResult`` per request, in order).

    Args:
        comps: loaded ``Components`` (all requests use this model).
        requests: ``GenerationRequest``s with batch_count 1 that agree on everything but their
            prompts, seeds, variation seeds and batch sizes.
        contexts: each request's ``ConditioningContext`` (embeddings).
        on_steps: each request's step callback (or None): called with its own rows.
    """
    contexts = contexts or [ConditioningContext()] * len(requests)
    on_steps = on_steps or [None] * len(requests)
    conds = [build_conditioning(ctx.text_encoder(comps, r.clip_skip), r, batch=r.batch_size)
             for r, ctx in zip(requests, contexts)]
    groups: dict[tuple, list[int]] = {}  # one UNet batch per text-context shape
    for j, cond in enumerate(conds):
        groups.setdefault(tuple(cond.conds[0].context.shape[1:]), []).append(j)
    results: list[PassResult | None] = [None] * len(requests)
    for members in groups.values():
        for j, result in zip(members, _sample_group(comps, [requests[j] for j in members], [conds[j] for j in members],
                                                    [on_steps[j] for j in members], device=device, dtype=dtype)):
            results[j] = result
    return results


def _sample_group(comps, requests: list, conds: list[ConditioningSchedule], on_steps: list, *, device, dtype):
    first = requests[0]
    factor = vae_scale_factor(comps.vae)
    shape = (comps.unet.config.in_channels, first.height // factor, first.width // factor)
    batches = [next(iter(Batches(r, device, count=1))) for r in requests]  # each request's seeds and generators
    noise = torch.cat([initial_noise(shape, b.generators, subseeds=b.subseeds, subseed_strength=r.subseed_strength)
                       for b, r in zip(batches, requests)])
    sizes = [len(b.seeds) for b in batches]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    slices = [slice(s, s + n) for s, n in zip(starts, sizes)]
    joint = Batch(0, 1, [s for b in batches for s in b.seeds], [s for b in batches for s in b.subseeds],
                  [g for b in batches for g in b.generators])
    members = _Members(on_steps, slices)
    cond = merge_schedules(conds, sizes, first.cfg_scale > 1.0)
    sampled = joint.sample(comps, noise.to(device=device, dtype=dtype), cond, sampler=first.sampler,
                           schedule=first.schedule, steps=first.steps, cfg_scale=first.cfg_scale,
                           on_step=members if any(c is not None for c in on_steps) else None)
    out = []
    for j, (batch, rows) in enumerate(zip(batches, slices)):
        latents, interrupted, _ = members.ended.get(j, (sampled.latents[rows], sampled.interrupted, False))
        out.append(PassResult(latents=[latents], seeds=list(batch.seeds), subseeds=list(batch.subseeds),
                              interrupted=interrupted))
    return out
