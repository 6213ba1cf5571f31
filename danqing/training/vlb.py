"""Improved DDPM's hybrid objective (Nichol & Dhariwal 2021), as small pure functions.

A UNet that also outputs a variance (diffusers' ``variance_type = "learned_range"``) learns it
from the variational bound: the plain MSE of the prediction plus the bound's term at t in bits
per dimension, with the mean's gradient stopped (``vlb_bits``). Hand-written: neither diffusers
nor another library here has the training side of ``learned_range``; the sampling side is
diffusers' ``DDPMScheduler``, which these functions match (a test)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device)[t].float().view(-1, *([1] * (like.dim() - 1)))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretised_nll(x0, mean, log_scale):
    """-log p(x0) under a Gaussian discretised to 256 levels over [-1, 1] (DDPM's decoder L_0)."""
    centred, inv = x0 - mean, torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv * (centred + 1 / 255))
    cdf_min = torch.special.ndtr(inv * (centred - 1 / 255))
    log_p = torch.where(x0 < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                        torch.where(x0 > 0.999, torch.log((1 - cdf_min).clamp(min=1e-12)),
                                    torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_p


def _posterior(scheduler):
    """(betas, alphas_cumprod, previous alphas_cumprod, clipped log posterior variance), float64:
    the posterior's variance at t = 0 (zero) is replaced by its value at t = 1, as Improved DDPM."""
    ac = scheduler.alphas_cumprod.double()
    betas = scheduler.betas.double()
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    return betas, ac, prev, torch.log(torch.cat([post_var[1:2], post_var[1:]]))


def model_log_variance(scheduler, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's log variance at t from its variance output v in [-1, 1]: (v + 1) / 2 of the
    way from the clipped log posterior variance to log beta_t (``learned_range``)."""
    betas, _, _, post_logvar = _posterior(scheduler)
    frac = (v + 1) / 2
    return frac * _at(betas.log(), t, v) + (1 - frac) * _at(post_logvar, t, v)


def vlb_bits(scheduler, x0, x_t, t, eps, v) -> torch.Tensor:
    """(B,) the variational bound's term at t in bits per dimension: KL(q(x_{t-1}|x_t,x0) ||
    p(x_{t-1}|x_t)) for t > 0, the discretised decoder's NLL at t = 0. The model's mean comes
    from ``eps`` (pass it detached: only the variance learns from this term) and its log
    variance interpolates log beta_t and the clipped log posterior variance by (v + 1) / 2 --
    what ``DDPMScheduler`` reads as ``learned_range``."""
    betas, ac, prev, post_logvar = _posterior(scheduler)
    coef1 = betas * prev.sqrt() / (1 - ac)
    coef2 = (1 - prev) * (1 - betas).sqrt() / (1 - ac)
    a_t, c1, c2 = _at(ac, t, x0), _at(coef1, t, x0), _at(coef2, t, x0)
    true_mean = c1 * x0 + c2 * x_t
    true_logvar = _at(post_logvar, t, x0)
    x0_pred = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    model_mean = c1 * x0_pred + c2 * x_t
    model_logvar = model_log_variance(scheduler, t, v)
    kl = _normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = _discretised_nll(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, nll, kl)


def hybrid_loss(out: torch.Tensor, scheduler, x0, x_t, t, noise, vlb_weight: float,
                prediction: str = "epsilon") -> torch.Tensor:
    """L_simple + ``vlb_weight`` * L_vlb of a UNet output (B, 6, H, W): its prediction (the noise,
    or with ``prediction = "v_prediction"`` the velocity sqrt(a) noise - sqrt(1 - a) x0) and
    its variance. L_simple is the MSE of the prediction; L_vlb reads the noise it implies."""
    pred, v = out.float().chunk(2, dim=1)
    if prediction == "v_prediction":
        loss = F.mse_loss(pred, scheduler.get_velocity(x0.float(), noise.float(), t).float())
        a = _at(scheduler.alphas_cumprod, t, x_t)
        eps = a.sqrt() * pred + (1 - a).sqrt() * x_t.float()
    else:
        loss = F.mse_loss(pred, noise.float())
        eps = pred
    if vlb_weight:
        loss = loss + vlb_weight * vlb_bits(scheduler, x0.float(), x_t.float(), t, eps.detach(), v).mean()
    return loss
