"""A1111 sampler and schedule-type names mapped onto diffusers schedulers.

The table itself is data (``data/samplers.json``). Flow-matching models (SD3, FLUX: a model
whose scheduler config is a ``FlowMatch*`` one) read its ``flow_samplers`` / ``flow_schedules``
under the same names: "Euler" on such a model is rectified-flow Euler. A scheduler is created fresh for every
request with ``Scheduler.from_config`` because diffusers schedulers keep their step state on the
object (``_step_index``, model-output history), which must never leak between requests.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from importlib import resources

from danqing.errors import UnknownSampler

AUTOMATIC = "Automatic"

# The keys of a model's scheduler config that describe how it was *trained* (the noise
# schedule); everything else about sampling comes from the sampler table.
TRAINING_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
)
# The same for flow-matching models: the timestep shift (static, or resolution-dependent).
FLOW_TRAINING_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                      "base_image_seq_len", "max_image_seq_len", "time_shift_type", "shift_terminal")


def is_flow_config(model_config: dict) -> bool:
    """Whether a model's scheduler config is a flow-matching one (SD3, FLUX)."""
    return str(model_config.get("_class_name", "")).startswith("FlowMatch")


@dataclass(frozen=True)
class SamplerSpec:
    """One row of the sampler table."""

    name: str
    class_name: str
    kwargs: dict = field(default_factory=dict)
    default_schedule: str = "Uniform"
    seeded: bool = False  # takes its noise seed in the config (torchsde Brownian tree)
    note: str = ""
    excluded: tuple[str, ...] = ()  # schedule types it has the options for but does not work with

    @functools.cached_property
    def scheduler_class(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    @functools.cached_property
    def init_params(self) -> frozenset[str]:
        return frozenset(inspect.signature(self.scheduler_class.__init__).parameters)

    @functools.cached_property
    def step_takes_generator(self) -> bool:
        return "generator" in inspect.signature(self.scheduler_class.step).parameters

    def supports(self, schedule_kwargs: dict, schedule: str = "") -> bool:
        return schedule not in self.excluded and all(k in self.init_params for k in schedule_kwargs)


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    text = resources.files("danqing").joinpath("data/samplers.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.lru_cache(maxsize=2)
def samplers(flow: bool = False) -> dict[str, SamplerSpec]:
    """All samplers danqing provides, by A1111 name, in A1111's order (``flow``: those for
    flow-matching models)."""
    out = {}
    for row in _table()["flow_samplers" if flow else "samplers"]:
        out[row["name"]] = SamplerSpec(
            name=row["name"],
            class_name=row["class"],
            kwargs=dict(row.get("kwargs", {})),
            default_schedule=row.get("schedule", "Uniform"),
            seeded=bool(row.get("seeded", False)),
            note=row.get("note", ""),
            excluded=tuple(row.get("excluded_schedules", ())),
        )
    return out


def schedules(flow: bool = False) -> dict[str, dict]:
    """Schedule types by A1111 name -> scheduler config overrides (without 'Automatic')."""
    return dict(_table()["flow_schedules" if flow else "schedules"])


def schedule_names(flow: bool = False) -> list[str]:
    return [AUTOMATIC, *schedules(flow)]


def schedules_for(sampler: str, flow: bool = False) -> list[str]:
    """The schedule types a sampler accepts (its scheduler has the needed config options)."""
    spec = get_sampler(sampler, flow=flow)
    return [AUTOMATIC] + [n for n, kw in schedules(flow).items() if spec.supports(kw, n)]


def get_sampler(name: str, *, flow: bool = False) -> SamplerSpec:
    """Look a sampler up by its A1111 name (case-insensitive); raise a listing error if unknown.

    Args:
        flow: look in the flow-matching table (SD3, FLUX).
    """
    table = samplers(flow)
    if name in table:
        return table[name]
    folded = {k.casefold(): v for k, v in table.items()}
    if name.casefold() in folded:
        return folded[name.casefold()]
    if flow:
        raise UnknownSampler("sampler", f"sampler {name!r} is not available for flow-matching models (SD3, FLUX); "
                             f"choose one of: {', '.join(table)}")
    why = _table()["unavailable"].get(name)
    head = f"sampler {name!r} is not available ({why})" if why else f"unknown sampler {name!r}"
    raise UnknownSampler("sampler", f"{head}; choose one of: {', '.join(table)}")


def resolve_schedule(sampler: str, schedule: str, *, flow: bool = False) -> str:
    """The concrete schedule type used for (sampler, schedule); 'Automatic' -> the sampler's default."""
    spec = get_sampler(sampler, flow=flow)
    table = schedules(flow)
    if schedule == AUTOMATIC or schedule.casefold() == AUTOMATIC.casefold():
        return spec.default_schedule
    match = next((n for n in table if n.casefold() == schedule.casefold()), None)
    if match is None:
        why = _table()["schedules_unavailable"].get(schedule)
        head = f"schedule type {schedule!r} is not available ({why})" if why else f"unknown schedule type {schedule!r}"
        if flow and why is None and schedule in schedules():
            head = f"schedule type {schedule!r} is not available for flow-matching models (SD3, FLUX)"
        raise UnknownSampler("schedule", f"{head}; choose one of: {', '.join(schedule_names(flow))}")
    if not spec.supports(table[match], match):
        raise UnknownSampler(
            "schedule",
            f"schedule type {match!r} does not work with sampler {spec.name!r}; "
            f"it takes: {', '.join(schedules_for(spec.name, flow))}",
        )
    return match


def scheduler_config(model_config: dict, sampler: str, schedule: str, *, seed: int | list[int] | None = None,
                     shift: float | None = None) -> tuple[str, dict]:
    """The class name and config of the scheduler for one request.

    Args:
        model_config: the model's own scheduler config (its training noise schedule; a
            ``FlowMatch*`` one selects the flow-matching table).
        sampler: A1111 sampler name.
        schedule: A1111 schedule type or 'Automatic'.
        seed: noise seed(s) for samplers whose noise lives in the config (DPM++ SDE).
        shift: flow-matching models only: a static timestep shift replacing the model's own
            (static or resolution-dependent) one (Forge's "Shift"); None = the model's.
    """
    flow = is_flow_config(model_config)
    spec = get_sampler(sampler, flow=flow)
    sched = resolve_schedule(spec.name, schedule, flow=flow)
    keys = FLOW_TRAINING_KEYS if flow else TRAINING_KEYS
    config = {k: v for k, v in model_config.items() if k in keys}
    if flow and shift is not None:
        config.update(shift=float(shift), use_dynamic_shifting=False)
    if flow and "flow_shift" in spec.init_params:  # DPM-Solver / UniPC name the static shift flow_shift
        config["flow_shift"] = config.pop("shift", 1.0)
    config.update(spec.kwargs)
    config.update(schedules(flow)[sched])
    if spec.seeded and seed is not None:
        config["noise_sampler_seed"] = seed
    if flow:  # the model's shift options that this scheduler does not have (Heun: no dynamic shifting)
        config = {k: v for k, v in config.items() if k in spec.init_params}
    return spec.class_name, config


def make_scheduler(model_config: dict, sampler: str, schedule: str, *, seed: int | list[int] | None = None,
                   shift: float | None = None):
    """A fresh diffusers scheduler for one request (see ``scheduler_config``)."""
    flow = is_flow_config(model_config)
    spec = get_sampler(sampler, flow=flow)
    _, config = scheduler_config(model_config, sampler, schedule, seed=seed, shift=shift)
    scheduler = spec.scheduler_class.from_config(config)
    return scheduler if flow else with_exact_schedule(scheduler, resolve_schedule(spec.name, schedule))


def sgm_uniform_sigmas(alphas_cumprod, steps: int) -> list[float]:
    """A1111/Forge's and ComfyUI's "SGM Uniform" (``sgm_uniform``): the sigmas at ``steps``
    timesteps evenly spaced from t(sigma_max) to t(sigma_min), the last left out, then 0.

    Fractional timesteps take their sigma by linear interpolation of log sigma (k-diffusion's
    ``DiscreteSchedule.t_to_sigma``). Returns steps + 1 sigmas.
    """
    import torch

    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, steps + 1)[:-1]
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return [*((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().tolist(), 0.0]


def simple_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """A1111/Forge's and ComfyUI's "Simple" (``simple_scheduler``): every (n/steps)-th of the
    model's n training sigmas from the largest down, ``sigmas[-(1 + int(x * n / steps))]``, as
    timesteps ``n - 1 - int(x * n / steps)`` (the final 0 is the scheduler's)."""
    ss = num_train_timesteps / steps
    return [num_train_timesteps - 1 - int(x * ss) for x in range(steps)]


def _exact_steps(scheduler, kind: str, steps: int) -> dict:
    if kind == "sgm_uniform":
        return {"sigmas": sgm_uniform_sigmas(scheduler.alphas_cumprod, steps)}
    return {"timesteps": simple_timesteps(scheduler.config.num_train_timesteps, steps)}


def with_exact_schedule(scheduler, schedule: str):
    """``scheduler`` computing ``schedule``'s steps exactly (the table's ``exact_schedules``:
    SGM Uniform, Simple) when its class is listed there; else unchanged. ``set_timesteps(n)``
    then passes the schedule's own sigmas or timesteps (the scheduler is this request's only)."""
    row = _table().get("exact_schedules", {}).get(schedule)
    if row is None or type(scheduler).__name__ not in row["classes"]:
        return scheduler
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps=None, device=None, **kwargs):
        if kwargs or num_inference_steps is None:  # the caller's own timesteps or sigmas
            return original(num_inference_steps, device=device, **kwargs)
        return original(device=device, **_exact_steps(scheduler, row["steps"], num_inference_steps))

    scheduler.set_timesteps = set_timesteps
    return scheduler
