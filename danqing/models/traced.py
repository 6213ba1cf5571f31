"""TorchScript traces of a UNet: the same arithmetic without Python's per-module cost.

A small UNet on the CPU spends about half its time in Python (module calls, attribute lookups,
diffusers' argument handling) rather than in kernels. ``torch.jit.trace`` records the tensor
operations of one call and replays them as a graph: the same kernels in the same order, so the
output is bit-identical (a test), with the Python gone. The UNet and each of its down, mid and
up blocks get a ``Tracer``: a module's first call with a given signature (the shapes, dtypes and
device of its tensors, the values of its other arguments) is traced and every later call with
that signature replays the trace. A plain call of the UNet replays one trace of the whole
network; a call the whole-network trace cannot take (SDXL's added conditioning dict) runs the
UNet's own code, and its blocks replay theirs. Code that composes the UNet's parts its own way
asks for a trace of its function with ``replay``: DeepCache's full and shallow branches are one
trace each.

A trace holds no weights of its own (it is not frozen): it reads the parameters when it runs,
so a LoRA merged into the weights in place, a change of memory format or a move of device is
seen as eager code sees it. What a trace cannot see is a change of the code that runs: a patched
class (token merging), an instance ``forward``, an attention processor other than diffusers'
stateless ones (IP-Adapter, Prompt-to-Prompt and regional prompts keep per-request state),
hooks, autograd into the weights. A module in such a state, or called with attention kwargs,
runs its own code; a changed attention processor, or a module replaced, is another trace
(``_code_key``).

Hand-written over ``torch.jit.trace`` because ``torch.compile`` (the other graph path, the
``compile`` option) takes minutes of CPU to build on this kind of machine and was not faster
for the tiny model (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Iterator

MAX_TRACES = 16  # traces kept per module (functions x signatures: sizes, batch, dtype); the oldest goes first
STATELESS_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0")
_OWN_CODE = ("torch.", "diffusers.")  # module classes a trace may stand in for


def unet_blocks(unet) -> list:
    """The blocks a trace replaces: down blocks, mid block, up blocks."""
    return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]


def _code_key(block, own_forward: bool = True) -> tuple | None:
    """What code a call of ``block`` runs: its modules (by identity: a trace reads the modules it
    was made from, so a module replaced by another of its class is another trace) and attention
    processors' classes, or None when a trace cannot replay it (a patched class, an instance
    forward, a stateful processor, a hook below the block). ``own_forward``: whether an instance
    forward on ``block`` itself counts (not for ``replay``, whose function calls the parts).
    Called on every traced call, so it walks the module tree by hand, with as little per module
    as it can (``nn.Module.modules`` costs about 10x as much; this walk about 0.2 us a module)."""
    d = block.__dict__
    if own_forward and "forward" in d:
        return None
    key = []
    append = key.append
    stack = [block]
    pop, extend = stack.pop, stack.extend
    own = _OWN_CODE_CLASSES
    while stack:
        m = pop()
        if m is None:  # an empty child slot
            continue
        d = m.__dict__
        cls = m.__class__
        ok = own.get(cls)
        if not (ok or (ok is None and _own_code(cls))):
            return None
        if m is not block and ("forward" in d or d["_forward_hooks"] or d["_forward_pre_hooks"]):
            return None
        proc = d.get("processor")
        if proc is not None:
            if proc.__class__.__name__ not in STATELESS_PROCESSORS:
                return None
            append(proc.__class__)
        append(id(m))  # the module itself: a trace keeps its modules alive, so an id is never reused
        extend(d["_modules"].values())
    return tuple(key)


_OWN_CODE_CLASSES: dict[type, bool] = {}


def _own_code(cls) -> bool:
    ok = _OWN_CODE_CLASSES[cls] = cls.__module__.startswith(_OWN_CODE)
    return ok


def _signature(value):
    """A hashable description of one argument: tensors by shape, dtype and device; tuples item
    by item; other values as they are. Raises TypeError for values a trace cannot take."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, tuple):
        return tuple(_signature(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and not value:  # no added conditioning, no attention kwargs
        return "{}"
    raise TypeError(type(value).__name__)


def _is_tensorish(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor) or (isinstance(value, tuple) and len(value) > 0
                                               and all(isinstance(v, torch.Tensor) for v in value))


def _bound(module, names: tuple[str, ...], static: dict):
    """``module.forward`` with the non-tensor arguments fixed, as a module of the tensors in
    ``names`` order: what a trace records."""
    import torch

    class Bound(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *tensors):
            return self.inner.forward(**dict(zip(names, tensors)), **static)

    return Bound()


def _bound_function(module, fn, names: tuple[str, ...], static: dict):
    """``fn(module, ...)`` with the non-tensor arguments fixed, as a module of the tensors in
    ``names`` order (``replay``)."""
    import torch

    class BoundFunction(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *tensors):
            return fn(self.inner, **dict(zip(names, tensors)), **static)

    return BoundFunction()


def _number_tensor(value, arguments: dict):
    """A Python timestep as the one-element tensor the UNet's ``get_time_embed`` makes of it, on
    the device of the other tensor arguments, so that a trace is not keyed on its value."""
    import torch

    device = next(v.device for v in arguments.values() if isinstance(v, torch.Tensor))
    return torch.tensor([value], dtype=torch.float32 if isinstance(value, float) else torch.int64, device=device)


class Tracer:
    """Replaces one module's ``__call__`` (``_compiled_call_impl``, what ``nn.Module.compile``
    sets): plain calls replay a trace, every other call runs the module's own ``_call_impl``.
    ``timestep``: the argument that, given as a Python number, becomes a tensor first (as the
    UNet's own ``get_time_embed`` makes it), so that a trace is not keyed on its value."""

    def __init__(self, module, timestep: str | None = None):
        self.module = module
        self.signature = inspect.signature(module.forward)
        self.timestep = timestep
        self.returns_dict = "return_dict" in self.signature.parameters
        self.first = next(module.parameters(), None)
        self.traces: dict = {}

    def __deepcopy__(self, memo):
        return None  # a copied model traces afresh: these traces read the original's weights

    def _eager(self) -> bool:
        """Whether calls must run Python code now: hooks on the module, tracing already under
        way, global hooks, or autograd into the weights."""
        import torch

        m = self.module
        return bool(m._forward_hooks or torch.jit.is_tracing() or torch.nn.modules.module._global_forward_hooks
                    or torch.nn.modules.module._global_forward_pre_hooks
                    or (torch.is_grad_enabled() and self.first is not None and self.first.requires_grad))

    def __call__(self, *args, **kwargs):
        import torch

        m = self.module
        code = None if self._eager() else _code_key(m)
        if code is None:
            return m._call_impl(*args, **kwargs)
        args, kwargs = self._pre_hooks(args, kwargs)
        bound = self.signature.bind(*args, **kwargs).arguments
        if (torch.is_grad_enabled() and any(getattr(v, "requires_grad", False) for v in bound.values())
                or any(isinstance(v, dict) and v for v in bound.values())  # attention / added kwargs
                or (self.returns_dict and bound.get("return_dict", True) is not False)):
            return m.forward(**bound)
        if self.timestep and isinstance(bound.get(self.timestep), (int, float)):
            bound[self.timestep] = _number_tensor(bound[self.timestep], bound)
        tensors = {k: v for k, v in bound.items() if _is_tensorish(v)}
        static = {k: v for k, v in bound.items() if k not in tensors}
        out = self._replay("forward", code, tensors, static, lambda: _bound(m, tuple(tensors), static))
        return m.forward(**bound) if out is None else out

    def replay(self, name: str, fn, tensors: dict, static: dict):
        """``fn(module, **tensors, **static)`` from a trace of it (see ``replay`` below)."""
        import torch

        m = self.module
        tensors = {**tensors, **{k: v for k, v in static.items() if _is_tensorish(v)}}  # never a trace's constants
        static = {k: v for k, v in static.items() if k not in tensors}
        # fn composes the module's parts itself: an instance forward on the module is not what runs
        code = None if self._eager() else _code_key(m, own_forward=False)
        if code is None or (torch.is_grad_enabled() and any(getattr(v, "requires_grad", False) for v in tensors.values())):
            return fn(m, **tensors, **static)
        tensors = {k: _number_tensor(v, tensors) if isinstance(v, (int, float)) else v for k, v in tensors.items()}
        out = self._replay(name, code, tensors, static, lambda: _bound_function(m, fn, tuple(tensors), static))
        return fn(m, **tensors, **static) if out is None else out

    def _replay(self, name: str, code: tuple, tensors: dict, static: dict, bound):
        """The trace for this call (made by tracing ``bound()`` on first use) run on ``tensors``;
        None when an argument has no signature a trace can be keyed on."""
        import torch

        try:
            key = (name, code, torch.is_autocast_enabled(), tuple((k, _signature(v)) for k, v in tensors.items()),
                   tuple((k, _signature(v)) for k, v in static.items()))
        except TypeError:
            return None
        trace = self.traces.get(key)
        if trace is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings: the signature is the key
                trace = torch.jit.trace(bound(), tuple(tensors.values()), check_trace=False, strict=False)
            if len(self.traces) >= MAX_TRACES:
                self.traces.pop(next(iter(self.traces)))
            self.traces[key] = trace
        return trace(*tensors.values())

    def _pre_hooks(self, args, kwargs):
        """The block's own forward pre-hooks, run as ``nn.Module`` runs them (DeepCache keeps
        the last up block's input this way)."""
        block = self.module
        for hook_id, hook in list(block._forward_pre_hooks.items()):
            if hook_id in block._forward_pre_hooks_with_kwargs:
                result = hook(block, args, kwargs)
                if result is not None:
                    args, kwargs = result
            else:
                result = hook(block, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        return args, kwargs


@contextlib.contextmanager
def traced_unet(unet) -> Iterator[None]:
    """The UNet and its blocks replayed from traces for the length of the block. A plain call
    of the UNet replays one trace of the whole network; a call it cannot replay (DeepCache's
    forward, SDXL's added conditioning) runs the UNet's own code, whose blocks replay theirs.
    The tracers (and their traces) stay with the modules, so later requests reuse them."""
    modules = [(unet, "timestep"), *((b, None) for b in unet_blocks(unet))]
    before = [m.__dict__.get("_compiled_call_impl") for m, _ in modules]
    for m, timestep in modules:
        tracer = m.__dict__.get("_danqing_tracer")
        if tracer is None or tracer.module is not m:
            tracer = m.__dict__["_danqing_tracer"] = Tracer(m, timestep)
        m._compiled_call_impl = tracer
    try:
        yield
    finally:
        for (m, _), prev in zip(modules, before):
            m._compiled_call_impl = prev


def replay(module, name: str, fn, tensors: dict, static: dict | None = None):
    """``fn(module, **tensors, **static)``, replayed from a trace of it while ``module`` is traced
    (inside ``traced_unet``) and the call is one a trace can take; otherwise ``fn`` runs. For
    code that composes a module's parts its own way, as DeepCache's full and shallow branches
    do: ``fn`` is a module-level function that reads nothing but its arguments and returns
    tensors; ``name`` keys its traces beside the module's own. A Python number among
    ``tensors`` (a timestep) becomes a one-element tensor."""
    static = static or {}
    tracer = module.__dict__.get("_compiled_call_impl")
    if not isinstance(tracer, Tracer):
        return fn(module, **tensors, **static)
    return tracer.replay(name, fn, tensors, static)
