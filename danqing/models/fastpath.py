"""The fast path: speed and memory options of a loaded model, applied for one request's scope.

``FastPath`` is one typed settings object (built once from the entry point's flags, held by the
``ModelManager``). ``applied(comps, fast, device)`` turns each option on and gives back exactly
what it changed when the scope ends, as ``customise.lora.patched`` does for weights: the shared
model is the same object, in the same state, after every request.

Every option here leaves the picture as the plain path makes it (max |diff| < 1e-3 in fp32 on
the CPU, a test), except VAE tiling where it actually tiles (pictures larger than one tile,
512 pixels for SD VAEs): diffusers blends the tile seams.

The options, each a row of ``OPTIONS`` (name, when it applies, the context that applies it):

- ``channels_last``: UNet and VAE weights in NHWC memory format (faster convolutions on
  recent GPUs and on CPUs with oneDNN).
- ``sdpa``: which scaled-dot-product-attention kernel PyTorch may use
  (``torch.nn.attention.sdpa_kernel``): "auto" (PyTorch picks), "flash", "efficient",
  "cudnn" or "math". The CPU has "flash" and "math".
- ``compile``: ``torch.compile`` of the UNet with this mode ("off", "default",
  "reduce-overhead" (CUDA graphs on CUDA), "max-autotune"); the compiled call is cached on the
  UNet, so only the first request of a shape pays the compile time.
- ``trace``: TorchScript traces of the UNet's down, mid and up blocks, one per call signature
  (``models.traced``): the same kernels without Python's per-module cost, bit-identical; a CPU
  win for small models. SD1/SD2/SDXL UNets; other denoisers run as they are.
- ``fuse_qkv``: diffusers' fused QKV projections (one matmul instead of three); fused after
  LoRA patching, so a LoRA's deltas are in the fused weights, and unfused at the end.
- ``vae_slicing`` / ``vae_tiling``: diffusers' AutoencoderKL decode one picture at a time /
  in overlapping tiles (memory; tiling changes pixels where it tiles).
- ``offload``: "none", "model" (A1111's ``--medvram``: each model moved to the GPU only while it
  runs, accelerate's ``cpu_offload_with_hook``) or "sequential" (``--lowvram``: each layer
  streamed to the GPU when it runs, accelerate's ``cpu_offload``). CUDA only.

torch is imported inside the functions: ``Settings`` holds a ``FastPath`` and the CLI's help
must not wait for torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable, Iterator

from danqing.errors import InvalidRequest

SDPA_BACKENDS = {  # name -> torch.nn.attention.SDPBackend members (None: PyTorch's own choice)
    "auto": None,
    "flash": ("FLASH_ATTENTION",),
    "efficient": ("EFFICIENT_ATTENTION",),
    "cudnn": ("CUDNN_ATTENTION",),
    "math": ("MATH",),
}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
OFFLOAD_MODES = ("none", "model", "sequential")
CPU_SDPA = ("auto", "flash", "math")  # kernels PyTorch has on the CPU


@dataclass(frozen=True)
class FastPath:
    """Speed and memory options of the model path (docs/benchmarks.md says which to use where).

    Attributes:
        channels_last: NHWC weights for the UNet and VAE.
        sdpa: attention kernel, one of ``SDPA_BACKENDS`` ("auto" = PyTorch's choice).
        compile: ``torch.compile`` mode of the UNet, one of ``COMPILE_MODES`` ("off").
        fuse_qkv: fused QKV projections in the UNet's attention.
        trace: the UNet's blocks replayed from TorchScript traces (not with ``compile``).
        vae_slicing, vae_tiling: decode one picture at a time / in tiles.
        offload: "none", "model" (``--medvram``) or "sequential" (``--lowvram``); CUDA only.
    """

    channels_last: bool = False
    sdpa: str = "auto"
    compile: str = "off"
    fuse_qkv: bool = False
    trace: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: str = "none"

    def __post_init__(self):
        for name, allowed in (("sdpa", tuple(SDPA_BACKENDS)), ("compile", COMPILE_MODES), ("offload", OFFLOAD_MODES)):
            if getattr(self, name) not in allowed:
                raise InvalidRequest(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.trace and self.fuse_qkv:
            raise InvalidRequest("trace", "give --fast trace or --fast fuse-qkv, not both: fused projections are new "
                                          "modules for every request, which a trace would have to follow anew")
        if self.trace and self.compile != "off":
            raise InvalidRequest("trace", "give --fast trace or --fast compile=..., not both: each replaces the "
                                          "UNet's Python with a graph")

    @property
    def is_plain(self) -> bool:
        return self == FastPath()

    def changed(self) -> dict[str, object]:
        """The options that differ from the plain path, by name."""
        plain = FastPath()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(plain, f.name)}


def check_device(fast: FastPath, device) -> None:
    """Refuse options the device cannot run, in one line naming the option."""
    if device.type != "cuda" and fast.offload != "none":
        flag = {"model": "--medvram", "sequential": "--lowvram"}[fast.offload]
        raise InvalidRequest("offload", f"--offload {fast.offload} ({flag}) needs a CUDA device: it moves models or "
                                        f"layers to the GPU as they run; this one is {device.type}")
    if device.type == "cpu" and fast.sdpa not in CPU_SDPA:
        raise InvalidRequest("sdpa", f"the CPU has the {', '.join(CPU_SDPA)} attention kernels, not {fast.sdpa!r}")


# -- the options, each a context that undoes itself ----------------------------------------------
@contextlib.contextmanager
def _channels_last(comps, fast: FastPath, device) -> Iterator[None]:
    import torch

    modules = [comps.unet, comps.vae]
    for m in modules:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in modules:
            m.to(memory_format=torch.contiguous_format)


def _sdpa(comps, fast: FastPath, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The chosen kernel first, PyTorch's math kernel behind it for the calls that kernel cannot
    # take: the VAE's one-head attention (head size 512 in SD) is beyond flash attention's 256.
    names = [*SDPA_BACKENDS[fast.sdpa], *(() if fast.sdpa == "math" else ("MATH",))]
    return sdpa_kernel([getattr(SDPBackend, name) for name in names], set_priority=True)


@contextlib.contextmanager
def _compile(comps, fast: FastPath, device) -> Iterator[None]:
    import torch

    unet = comps.unet
    cache = unet.__dict__.setdefault("_danqing_compiled", {})  # mode -> compiled call, lives with the UNet
    if fast.compile not in cache:
        cache[fast.compile] = torch.compile(unet._call_impl, mode=None if fast.compile == "default" else fast.compile)
    before = unet.__dict__.get("_compiled_call_impl")
    unet._compiled_call_impl = cache[fast.compile]  # what nn.Module.compile() sets
    try:
        yield
    finally:
        unet._compiled_call_impl = before


@contextlib.contextmanager
def _fuse_qkv(comps, fast: FastPath, device) -> Iterator[None]:
    from diffusers.models.attention_processor import Attention

    unet = comps.unet
    processors = unet.attn_processors
    unet.fuse_qkv_projections()
    try:
        yield
    finally:
        unet.set_attn_processor(processors)
        unet.original_attn_processors = None
        for m in unet.modules():  # back to the unfused module tree
            if isinstance(m, Attention) and getattr(m, "fused_projections", False):
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(m, name):
                        delattr(m, name)
                m.fused_projections = False


def _trace(comps, fast: FastPath, device):
    from danqing.models.traced import traced_unet

    unet = comps.unet
    if not hasattr(unet, "down_blocks"):  # SD3 / FLUX transformers: not traced
        return contextlib.nullcontext()
    return traced_unet(unet)


@contextlib.contextmanager
def _vae_flag(attr: str, comps) -> Iterator[None]:
    vae = comps.vae
    before = getattr(vae, attr, False)
    setattr(vae, attr, True)  # what diffusers' enable_slicing / enable_tiling set
    try:
        yield
    finally:
        setattr(vae, attr, before)


@contextlib.contextmanager
def _offload(comps, fast: FastPath, device) -> Iterator[None]:
    from accelerate import cpu_offload, cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    import torch

    mods = comps.modules()  # in the order they run: text encoders, the denoiser, the VAE
    modules = [mods.pop(k) for k in ("text_encoder", "text_encoder_2", "text_encoder_3") if k in mods]
    modules += [m for k, m in mods.items() if k != "vae"] + [mods["vae"]]
    try:
        hook = None
        for m in modules:  # in the order they run, as diffusers' enable_model_cpu_offload
            if fast.offload == "model":
                _, hook = cpu_offload_with_hook(m, device, prev_module_hook=hook)
            else:
                cpu_offload(m, device, offload_buffers=len(m._parameters) > 0)
        yield
    finally:
        for m in modules:
            remove_hook_from_module(m, recurse=True)
            m.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# (name, applies when, context factory); entered in this order, left in reverse.
OPTIONS: tuple[tuple[str, Callable[[FastPath], bool], Callable], ...] = (
    ("offload", lambda f: f.offload != "none", _offload),
    ("channels_last", lambda f: f.channels_last, _channels_last),
    ("fuse_qkv", lambda f: f.fuse_qkv, _fuse_qkv),
    ("vae_slicing", lambda f: f.vae_slicing, lambda c, f, d: _vae_flag("use_slicing", c)),
    ("vae_tiling", lambda f: f.vae_tiling, lambda c, f, d: _vae_flag("use_tiling", c)),
    ("sdpa", lambda f: f.sdpa != "auto", _sdpa),
    ("compile", lambda f: f.compile != "off", _compile),
    ("trace", lambda f: f.trace, _trace),
)


@contextlib.contextmanager
def applied(comps, fast: FastPath, device) -> Iterator[None]:
    """Turn ``fast``'s options on for ``comps`` (loaded Components on ``device``) for the
    length of the block; everything they changed is put back when it ends, even on error.

    ``fuse_qkv`` needs the attention processors diffusers installs (no IP-Adapter yet): enter
    this before other processors are installed for the request.
    """
    check_device(fast, device)
    with contextlib.ExitStack() as stack:
        for _, when, make in OPTIONS:
            if when(fast):
                stack.enter_context(make(comps, fast, device))
        yield


FLAGS = {"channels-last": "channels_last", "fuse-qkv": "fuse_qkv", "trace": "trace", "vae-slicing": "vae_slicing",
         "vae-tiling": "vae_tiling"}  # --fast NAME (on/off options)
VALUED = {"sdpa": "sdpa", "compile": "compile"}  # --fast NAME=VALUE
FAST_HELP = ("Fast path option, repeatable: channels-last, fuse-qkv, trace, vae-slicing, vae-tiling, sdpa=auto|flash|efficient|"
             "cudnn|math, compile=default|reduce-overhead|max-autotune (docs/benchmarks.md) [default: none]")


def fast_path_from(options: list[str] = (), *, medvram: bool = False, lowvram: bool = False,
                   offload: str | None = None) -> FastPath:
    """The ``FastPath`` of the command line's ``--fast`` options, ``--offload model|sequential`` and
    A1111's ``--medvram`` / ``--lowvram`` (the same two); an unknown option is an ``InvalidRequest``
    listing the known ones."""
    values: dict[str, object] = {}
    for option in options:
        name, sep, value = option.strip().partition("=")
        if not sep and name in FLAGS:
            values[FLAGS[name]] = True
        elif sep and name in VALUED:
            values[VALUED[name]] = value
        else:
            raise InvalidRequest("fast", f"unknown fast-path option {option!r}; known: {', '.join(FLAGS)}, "
                                 f"{', '.join(f'{k}=...' for k in VALUED)}")
    if medvram and lowvram:
        raise InvalidRequest("lowvram", "give --medvram or --lowvram, not both")
    if medvram or lowvram:
        values["offload"] = "sequential" if lowvram else "model"
    if offload is not None:
        if offload not in OFFLOAD_MODES[1:]:
            raise InvalidRequest("offload", f"must be model (each model on the GPU only while it runs) or sequential "
                                            f"(each layer streamed to the GPU), got {offload!r}")
        if values.get("offload", offload) != offload:
            raise InvalidRequest("offload", f"--offload {offload} and --{'lowvram' if lowvram else 'medvram'} ask "
                                            "for different offloads; give one")
        values["offload"] = offload
    return FastPath(**values)
