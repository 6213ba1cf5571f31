"""Few-step models by distillation into a LoRA: latent consistency (LCM-LoRA) and phased consistency.

``danqing train distill --config configs/train/distill-danqing-tiny.toml`` teaches a LoRA on top of a
model to jump from any point of the model's own guided ODE trajectory to its end, so that the
``LCM`` sampler draws with 4 steps and CFG 1 what the model draws with 20 steps and CFG 7
(Luo et al. 2023, "Latent Consistency Models"; "LCM-LoRA"). The result is a kohya LoRA: a prompt
carries ``<lora:NAME:1>`` with the ``LCM`` sampler, as A1111 users run LCM-LoRA.

One step of the objective (``lcm_loss``), on a latent ``z`` of the training data:

* a solver timestep ``t`` (one of the ``solver_steps`` DDIM timesteps 19, 39, ..., 999 of a
  1000-step schedule) and the previous one ``s = t - k``;
* the student (the model with the LoRA) predicts the trajectory's end from ``x_t`` through the
  consistency parametrisation ``c_skip(t) x_t + c_out(t) x0(x_t)``;
* the teacher (the model without the LoRA, guided at ``guidance`` as CFG, no gradients) takes one
  DDIM step ``x_t -> x_s``;
* the target is the student's own prediction at ``(x_s, s)`` without gradients; the loss a
  pseudo-Huber distance between the two.

The boundary scalings and the solver's timesteps are those the ``LCMScheduler`` samples with
(``timestep_scaling`` 10, ``original_inference_steps`` = ``solver_steps``), so the sampler
and the training agree.

**Phased consistency** (``method = "pcd"``; Wang et al. 2024, "Phased Consistency Model"): an
LCM maps every point of the trajectory to its end, and its sampler throws the rest of the
trajectory away at each step (fresh noise). With as many phases as sampling steps, each point is
mapped only to the lower edge of its phase instead -- the timestep the deterministic sampler
visits next -- so every step is one exact DDIM jump along the teacher's trajectory
(``pcd_loss``). The phases are the timesteps of diffusers' ``DDIMScheduler`` on the ``Simple``
(trailing) schedule: 999, 749, 499, 249 and the final jump for 4 steps (``phase_edges``); the
student's jump is DDIM's own step from its noise prediction, which is the identity at an edge,
so no boundary scalings are needed. Used as ``DDIM``, schedule ``Simple``, CFG 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from danqing.training.conditioning import text_conditioning

Log = Callable[[str], None]


def boundary_scalings(t: torch.Tensor, *, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the consistency parametrisation at timesteps ``t``: c_skip(0) = 1 and
    c_out(0) = 0, so the model is the identity at the trajectory's end (as ``LCMScheduler``)."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def solver_timesteps(num_train_timesteps: int, solver_steps: int) -> torch.Tensor:
    """The DDIM solver's timesteps, ascending: k - 1, 2k - 1, ..., num_train_timesteps - 1."""
    k = num_train_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1) * k - 1


def _x0(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The clean latent an epsilon prediction implies: (x - sqrt(1 - a) eps) / sqrt(a)."""
    a = a.view(-1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def _b(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta 0) from ``x_t`` to the timestep whose cumulative alpha is
    ``a_s``, given the noise prediction ``eps``."""
    return _b(a_s.sqrt()) * _x0(x_t, eps, a_t) + _b((1 - a_s).sqrt()) * eps


def _draw(noise_sched, z: torch.Tensor, g: torch.Generator, solver_steps: int, rows):
    """(solver timesteps t, noise, the solver's stride k) for this process's rows of the batch;
    the draws are the whole batch's, from ``g``, whatever the rows."""
    part, total = rows if rows is not None else (slice(None), z.shape[0])
    T = noise_sched.config.num_train_timesteps
    idx = torch.randint(0, solver_steps, (total,), generator=g)
    noise = torch.randn((total, *z.shape[1:]), generator=g)
    idx, noise = idx[part].to(z.device), noise[part].to(z.device)
    return solver_timesteps(T, solver_steps).to(z.device)[idx], noise, T // solver_steps


def _teacher_step(unet, teacher, x_t, t, ctx, uncond, guidance: float, a_t, a_s) -> torch.Tensor:
    """The guided teacher's DDIM step x_t -> x_s (call without gradients)."""
    with teacher():
        e_c, e_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([ctx, uncond])).sample.chunk(2)
    return ddim_step(x_t, e_u + guidance * (e_c - e_u), a_t, a_s)


def _pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance (B,)."""
    return (((pred.float() - target.float()) ** 2 + c**2).sqrt() - c).mean(dim=(1, 2, 3))


def lcm_loss(unet, noise_sched, z: torch.Tensor, ctx: torch.Tensor, uncond: torch.Tensor, g: torch.Generator, *,
             teacher: Callable[[], object], guidance: float, solver_steps: int = 50, huber_c: float = 1e-3,
             timestep_scaling: float = 10.0, rows: tuple[slice, int] | None = None) -> torch.Tensor:
    """Per-sample latent consistency distillation loss (B,) of scaled latents ``z`` (an epsilon
    model).

    Args:
        unet: the student (the base UNet with the LoRA active).
        ctx, uncond: the captions' and the empty prompt's contexts, (B, 77, D) each.
        teacher: a context manager factory under which ``unet`` is the base model (the LoRA off).
        guidance: the teacher's CFG scale (A1111's: 1 = no guidance).
        rows: (this process's rows, the whole batch size), as ``diffusion_loss``.
    """
    dev = z.device
    t, noise, k = _draw(noise_sched, z, g, solver_steps, rows)
    s = (t - k).clamp(min=0)
    a = noise_sched.alphas_cumprod.to(dev)
    a_t, a_s = a[t], a[s]
    c_skip_t, c_out_t = boundary_scalings(t, timestep_scaling=timestep_scaling)
    c_skip_s, c_out_s = boundary_scalings(s, timestep_scaling=timestep_scaling)

    x_t = noise_sched.add_noise(z, noise, t)
    eps = unet(x_t, t, encoder_hidden_states=ctx).sample
    pred = _b(c_skip_t) * x_t + _b(c_out_t) * _x0(x_t, eps, a_t)
    with torch.no_grad():
        x_s = _teacher_step(unet, teacher, x_t, t, ctx, uncond, guidance, a_t, a_s)
        eps_s = unet(x_s, s, encoder_hidden_states=ctx).sample
        target = _b(c_skip_s) * x_s + _b(c_out_s) * _x0(x_s, eps_s, a_s)
    return _pseudo_huber(pred, target, huber_c)


SAMPLING = {"lcm": ("LCM", "Automatic"), "pcd": ("DDIM", "Simple")}  # method -> (sampler, schedule) it is made for


def phase_edges(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The lower edges of the phases, descending: the timesteps DDIM visits after its first on the
    trailing ("Simple") schedule, then -1 for its final jump (to the final cumulative alpha)."""
    visited = torch.round(torch.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).long() - 1
    return torch.cat([visited[1:], torch.tensor([-1])])


def _alpha(a: torch.Tensor, final: float, t: torch.Tensor) -> torch.Tensor:
    """Cumulative alpha at timesteps ``t``; -1 is the final jump's (``final_alpha_cumprod``)."""
    return torch.where(t >= 0, a[t.clamp(min=0)], torch.full_like(a[:1], final).expand(t.shape))


def pcd_loss(unet, noise_sched, z: torch.Tensor, ctx: torch.Tensor, uncond: torch.Tensor, g: torch.Generator, *,
             teacher: Callable[[], object], guidance: float, edges: torch.Tensor, final_alpha: float,
             solver_steps: int = 50, huber_c: float = 1e-3, rows: tuple[slice, int] | None = None) -> torch.Tensor:
    """Per-sample phased consistency distillation loss (B,) of scaled latents ``z`` (an epsilon
    model): the student's DDIM jump from ``x_t`` to its phase's lower edge ``e`` against the same
    jump from ``x_s``, one guided teacher DDIM step later (``s = max(t - k, e)``; at the edge the
    target is the teacher's point itself). Arguments as ``lcm_loss``; ``edges``: ``phase_edges``."""
    dev = z.device
    t, noise, k = _draw(noise_sched, z, g, solver_steps, rows)
    edges = edges.to(dev)
    e = torch.where(edges[None, :] < t[:, None], edges[None, :], torch.full_like(edges, -2)[None, :]).max(dim=1).values
    s = torch.maximum(t - k, e)
    a = noise_sched.alphas_cumprod.to(dev)
    a_t, a_s, a_e = a[t], _alpha(a, final_alpha, s), _alpha(a, final_alpha, e)

    x_t = noise_sched.add_noise(z, noise, t)
    pred = ddim_step(x_t, unet(x_t, t, encoder_hidden_states=ctx).sample, a_t, a_e)
    with torch.no_grad():
        x_s = _teacher_step(unet, teacher, x_t, t, ctx, uncond, guidance, a_t, a_s)
        onward = ddim_step(x_s, unet(x_s, s.clamp(min=0), encoder_hidden_states=ctx).sample, a_s, a_e)
        target = torch.where(_b(s == e), x_s, onward)
    return _pseudo_huber(pred, target, huber_c)


def distill_objective(comps, distill_cfg) -> Callable[..., torch.Tensor]:
    """The ``loss_fn`` of ``run_loop`` for consistency distillation of ``comps``' UNet (its LoRA
    adapters train; disabling them gives the teacher): ``lcm_loss`` or ``pcd_loss``."""
    from contextlib import contextmanager

    if comps.family not in ("sd1", "sd2") or comps.prediction_type != "epsilon":
        from danqing.errors import InvalidRequest

        raise InvalidRequest("model.base", f"LCM distillation needs an SD1/SD2 epsilon model; this one is {comps.family} "
                             f"({comps.prediction_type})")
    base = comps.unet
    empty: dict = {}
    # DDIM's final jump: to alphas_cumprod[0] unless the model's scheduler says set_alpha_to_one
    final_alpha = 1.0 if comps.scheduler_config.get("set_alpha_to_one", True) else None  # DDIM's default

    @contextmanager
    def teacher():
        base.disable_adapters()
        try:
            yield
        finally:
            base.enable_adapters()

    def loss_fn(c, noise_sched, z, ctx, added, g, weight_map, rows):
        nonlocal final_alpha
        if final_alpha is None:
            final_alpha = float(noise_sched.alphas_cumprod[0])
        if "ctx" not in empty:
            with torch.no_grad():
                empty["ctx"] = text_conditioning(c, [""], (1, 1), z.device)[0]
        uncond = empty["ctx"].expand(z.shape[0], -1, -1)
        if distill_cfg.method == "pcd":
            return pcd_loss(c.unet, noise_sched, z, ctx, uncond, g, teacher=teacher, guidance=distill_cfg.guidance,
                            edges=phase_edges(noise_sched.config.num_train_timesteps, distill_cfg.sample_steps),
                            final_alpha=final_alpha, solver_steps=distill_cfg.solver_steps,
                            huber_c=distill_cfg.huber_c, rows=rows)
        return lcm_loss(c.unet, noise_sched, z, ctx, uncond, g, teacher=teacher, guidance=distill_cfg.guidance,
                        solver_steps=distill_cfg.solver_steps, huber_c=distill_cfg.huber_c,
                        timestep_scaling=distill_cfg.timestep_scaling, rows=rows)

    return loss_fn
