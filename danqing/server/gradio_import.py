"""Import Gradio without its type-stub upkeep.

Every Gradio component class, as it is defined, re-reads its own source file, parses it and
rewrites the matching ``.pyi`` stub beside it (``gradio.component_meta.create_or_modify_pyi``):
stubs for type checkers, used by nobody at run time. On a 2-core machine that is about 4 of the
7 seconds ``import gradio`` takes, and so nearly half of ``danqing serve``'s start. ``gradio()``
imports Gradio with that step skipped; every component, event and route is unchanged.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "gradio.component_meta"


def _skip_stubs(*args, **kwargs) -> None:
    """Stands in for ``create_or_modify_pyi``: the stubs that ship with Gradio stay as they are."""


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        if hasattr(module, "create_or_modify_pyi"):
            module.create_or_modify_pyi = _skip_stubs


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def gradio():
    """The ``gradio`` module, imported (once) with the stub upkeep skipped."""
    if "gradio" not in sys.modules:
        finder = _Finder()
        sys.meta_path.insert(0, finder)
        try:
            import gradio  # noqa: F401
        finally:
            sys.meta_path.remove(finder)
    return sys.modules["gradio"]
