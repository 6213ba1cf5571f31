"""Few-step sampling: the LCM and TCD samplers, the "SGM Uniform" and "Simple" schedules as
A1111/Forge and ComfyUI compute them, and the CFG-1 fast path (one UNet branch).

Parity: our loop vs the stock diffusers ``StableDiffusionPipeline`` on the tiny SD1 model
(tests/conftest.py), same scheduler, seed and prompt: max |diff| < 1e-4 on the latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danqing import GenerationRequest
from danqing.sampling.samplers import make_scheduler, sgm_uniform_sigmas, simple_timesteps

PROMPT = "a red circle left of a blue star"
BASE = dict(prompt=PROMPT, width=64, height=64, model="tiny-sd1")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest gives the count back; a busy 2-core machine is far faster so


def _pipeline(comps, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_latents(comps, request, scheduler, **call):
    with torch.no_grad():
        return _pipeline(comps, scheduler)(
            request.prompt, negative_prompt=request.negative_prompt or None, guidance_scale=request.cfg_scale,
            height=request.height, width=request.width, output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(request.seed)], **call).images


def _ours(studio, request):
    result = studio.generate(request)
    return result.latents[0], studio.models.load(request.model).components


@pytest.mark.parametrize("sampler,steps,cfg", [("LCM", 4, 1.0), ("TCD", 4, 1.0), ("TCD", 6, 3.0)])
def test_lcm_and_tcd_match_diffusers(studio, sampler, steps, cfg):
    request = GenerationRequest(**BASE, negative_prompt="blurry", sampler=sampler, steps=steps, cfg_scale=cfg, seed=21)
    ours, comps = _ours(studio, request)
    scheduler = make_scheduler(comps.scheduler_config, sampler, "Automatic", seed=request.seed)
    assert type(scheduler).__name__ == {"LCM": "LCMScheduler", "TCD": "TCDScheduler"}[sampler]
    # TCD's gamma: the scheduler's default 0.3 in our loop; the pipeline passes its own eta (0.0) unless told
    extra = {"eta": 0.3} if sampler == "TCD" else {}
    ref = _diffusers_latents(comps, request, scheduler, num_inference_steps=steps, **extra)
    assert (ours - ref).abs().max().item() < 1e-4


def _k_diffusion_sigma_to_t(sigma, log_sigmas):
    """k-diffusion ``DiscreteSchedule.sigma_to_t`` (what A1111/Forge's ``sgm_uniform`` calls)."""
    log_sigma = np.log(sigma)
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), None, len(log_sigmas) - 2))
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def test_schedules_are_a1111s(studio):
    """SGM Uniform and Simple against A1111's ``sgm_uniform`` / ``simple_scheduler`` written out
    here from k-diffusion's discrete schedule (float64)."""
    comps = studio.models.load("tiny-sd1").components
    ac = make_scheduler(comps.scheduler_config, "Euler", "Uniform").alphas_cumprod.double().numpy()
    sigmas = np.sqrt((1 - ac) / ac)
    log_sigmas = np.log(sigmas)
    for n in (1, 3, 4, 7, 20):
        start, end = _k_diffusion_sigma_to_t(sigmas.max(), log_sigmas), _k_diffusion_sigma_to_t(sigmas.min(), log_sigmas)
        ts = np.linspace(start, end, n + 1)[:-1]
        ref = [np.exp(np.interp(t, np.arange(len(sigmas)), log_sigmas)) for t in ts] + [0.0]
        np.testing.assert_allclose(sgm_uniform_sigmas(torch.from_numpy(ac).float(), n), ref, rtol=1e-5)
        simple = [sigmas[-(1 + int(x * len(sigmas) / n))] for x in range(n)]
        np.testing.assert_allclose(sigmas[simple_timesteps(len(sigmas), n)], simple, rtol=0)
    # the schedulers take them: Euler runs SGM Uniform's sigmas, DPM++ 2M Simple's timesteps
    euler = make_scheduler(comps.scheduler_config, "Euler", "SGM Uniform")
    euler.set_timesteps(5)
    np.testing.assert_allclose(euler.sigmas.numpy(), sgm_uniform_sigmas(euler.alphas_cumprod, 5), rtol=1e-6)
    dpm = make_scheduler(comps.scheduler_config, "DPM++ 2M", "Simple")
    dpm.set_timesteps(3)
    assert dpm.timesteps.tolist() == [999, 666, 333]  # trailing spacing would round 666.67 down to 332


@pytest.mark.parametrize("sampler,schedule", [("Euler", "SGM Uniform"), ("Euler", "Simple"), ("DPM++ 2M", "Simple")])
def test_exact_schedules_match_diffusers_given_the_same_steps(studio, sampler, schedule):
    """Our loop vs the pipeline handed A1111's sigmas (timesteps) on a plain scheduler."""
    request = GenerationRequest(**BASE, negative_prompt="blurry", sampler=sampler, schedule=schedule, steps=5, seed=4)
    ours, comps = _ours(studio, request)
    plain = make_scheduler(comps.scheduler_config, sampler, "Uniform")
    if schedule == "SGM Uniform":
        call = {"sigmas": sgm_uniform_sigmas(plain.alphas_cumprod, 5)}
    else:
        call = {"timesteps": simple_timesteps(plain.config.num_train_timesteps, 5)}
    ref = _diffusers_latents(comps, request, plain, **call)
    assert (ours - ref).abs().max().item() < 1e-4


def test_cfg_one_runs_one_branch_and_equals_two_branches(studio):
    """CFG 1: the UNet sees batch 1 (no unconditional branch), the negative prompt is not
    encoded, and the result equals eps_u + 1 * (eps_c - eps_u) with both branches run."""
    from danqing.conditioning.schedule import build_conditioning
    from danqing.conditioning.text import TextEncoder
    from danqing.sampling.loop import denoise, sample
    from danqing.sampling.noise import initial_noise, make_generators

    comps = studio.models.load("tiny-sd1").components
    request = GenerationRequest(**BASE, negative_prompt="blurry", sampler="Euler", steps=4, cfg_scale=1.0, seed=9)
    rows, negatives = [], []
    hook = comps.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    encode = TextEncoder.encode
    TextEncoder.encode = lambda self, text, negative=False: negatives.append(negative) or encode(self, text, negative=negative)
    try:
        fast = studio.generate(request).latents[0]
    finally:
        hook.remove()
        TextEncoder.encode = encode
    assert rows == [1] * 4 and True not in negatives

    both = build_conditioning(TextEncoder(comps), request.replace(cfg_scale=2.0), batch=1)  # [uncond; cond]
    noise = initial_noise(tuple(fast.shape[1:]), make_generators([request.seed]))
    two = sample(comps.unet, make_scheduler(comps.scheduler_config, "Euler", "Automatic"), noise, both, steps=4,
                 cfg_scale=1.0, denoise_fn=lambda unet, x, t, cond, s, _: denoise(unet, x, t, cond, s, True))
    # relative to the latents' scale (about 25 for this random tiny model): batch 1 vs 2 and the
    # CFG sum round differently (measured 2.2e-5 absolute, 9e-7 relative)
    assert (fast - two.latents).abs().max().item() <= 1e-5 * two.latents.abs().max().item()
