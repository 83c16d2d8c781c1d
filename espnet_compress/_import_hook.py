"""Register espnet_compress into ESPnet the moment ESPnet's ASR task module is imported.

ESPnet has no plugin entry points: ``espnet2.tasks.asr`` builds its ``ClassChoices`` dicts at import
time and its argument parser reads them later. A ``.pth`` file installed with this package imports
this module at interpreter start; it only appends a tiny finder to ``sys.meta_path`` (no torch, no
espnet import), so it costs nothing until ``espnet2.tasks.asr`` is actually imported. Then the finder
wraps that module's loader so :func:`espnet_compress.registry.register` runs right after the module
body, before any caller can build a parser. Stock ``asr_train``, ``asr_inference``, ``pack`` and
``Speech2Text`` therefore see our names without any edit to ESPnet or to ``asr.sh``.

Set ``ESPNET_COMPRESS_NO_HOOK=1`` to disable (e.g. to check that an export loads in plain ESPnet).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Optional, Sequence

from espnet_compress.env import hook_disabled

TARGET = "espnet2.tasks.asr"


class _RegisterAfterExec(importlib.abc.Loader):
    """Delegating loader: run the real module body, then register our classes into it."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        from espnet_compress.registry import register

        register(module)


class _AsrTaskFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; only intercepts the spec of ``espnet2.tasks.asr``."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    """Install the finder once (idempotent); if ESPnet's ASR task is already imported, register now."""
    if hook_disabled():
        return
    if any(isinstance(f, _AsrTaskFinder) for f in sys.meta_path):
        return
    if TARGET in sys.modules:
        from espnet_compress.registry import register

        register(sys.modules[TARGET])
        return
    sys.meta_path.insert(0, _AsrTaskFinder())


install()
