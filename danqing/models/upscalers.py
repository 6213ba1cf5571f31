"""Loading model upscalers and face restorers (``.pth``, ``.pt``, ``.safetensors`` files the
user provides) through spandrel.

spandrel (https://github.com/chaiNNer-org/spandrel) reads the architecture and its
hyper-parameters from the state dict (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, GFPGAN, ...), so
no network is written by hand here. Pickle files are read by spandrel's restricted unpickler
(tensors and plain containers only; the same guarantee as ``torch.load(weights_only=True)``).
Placing and caching the models is the ModelManager's (``load_upscaler``); finding the files in
the models folder and running the models, tiled, is ``danqing.editing.upscalers``'.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types
from pathlib import Path

from danqing.errors import ModelError

_STANDINS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def import_spandrel():
    """Import spandrel without torchvision.

    spandrel 0.4.2 declares and imports torchvision, but PyPI has no torchvision that works with
    the CPU torch build danqing pins (see the Makefile). Only two of its architectures use
    it (LaMa: ``InterpolationMode``, ``rotate``; RestoreFormer: ``normalize``), yet
    ``import spandrel`` imports every architecture. So, only when torchvision is truly absent,
    stand-in modules are put into ``sys.modules`` for the import and removed right after it
    (``finally``): transformers and diffusers probe ``importlib.util.find_spec("torchvision")``
    and must never see them. The stand-ins' functions raise a clear error, so LaMa and
    RestoreFormer files fail loudly when run; every other architecture works.
    """
    if "spandrel" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import spandrel

        return spandrel

    def needs_torchvision(*args, **kwargs):
        raise ModelError("the LaMa/RestoreFormer architecture needs torchvision, which has no build for "
                         "the CPU torch danqing pins")

    class InterpolationMode(enum.Enum):  # torchvision's members, for LaMa's module-level uses
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    tv, tr, fn = (types.ModuleType(name) for name in _STANDINS)
    tv.transforms, tr.functional = tr, fn
    fn.InterpolationMode, fn.rotate, fn.normalize = InterpolationMode, needs_torchvision, needs_torchvision
    sys.modules.update(zip(_STANDINS, (tv, tr, fn)))
    try:
        import spandrel
    finally:
        for name in _STANDINS:
            sys.modules.pop(name, None)
    return spandrel


def load_descriptor(path: Path):
    """A spandrel ``ImageModelDescriptor`` for a weight file, on the CPU in fp32.

    spandrel's ``ModelLoader`` reads ``.pth`` with a restricted unpickler and ``.safetensors``
    with safetensors; ``.pt`` files are read as state dicts only (never TorchScript, which runs
    code)."""
    spandrel = import_spandrel()
    path = Path(path)
    loader = spandrel.ModelLoader(device="cpu", registry=_registry(spandrel))
    try:
        if path.suffix.lower() == ".pt":
            state = spandrel.canonicalize_state_dict(loader._load_pth(path))
        else:
            state = loader.load_state_dict_from_file(path)
        desc = loader.load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        extra = "" if _extra_arches() else ", which is not installed"
        raise ModelError(f"{path.name}: not an upscaler or face-restoration model that spandrel knows "
                         f"(CodeFormer files need the separate spandrel_extra_arches package{extra})") from None
    except ModelError:
        raise
    except Exception as e:  # a corrupt or foreign file: one line, the file named
        raise ModelError(f"{path.name}: cannot be read as an upscaler ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise ModelError(f"{path.name}: a {desc.architecture.name} model ({desc.purpose}), not an upscaler "
                         f"or a face-restoration model")
    return desc.float().eval()


def _extra_arches():
    """spandrel_extra_arches (CodeFormer, ...), a separate package whose CodeFormer weights come
    under a non-commercial licence: used when the user installed it (``pip install --no-deps
    spandrel-extra-arches==0.2.0``; it declares torchvision too), else None."""
    if importlib.util.find_spec("spandrel_extra_arches") is None:
        return None
    import spandrel_extra_arches

    return spandrel_extra_arches


def _registry(spandrel):
    """spandrel's main registry, plus spandrel_extra_arches' when installed (a new registry: the
    library's global one is left as it is)."""
    extra = _extra_arches()
    if extra is None:
        return spandrel.MAIN_REGISTRY
    reg = spandrel.ArchRegistry()
    reg.add(*spandrel.MAIN_REGISTRY)
    reg.add(*extra.EXTRA_REGISTRY, ignore_duplicates=True)
    return reg
