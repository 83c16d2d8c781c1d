"""Classes with a decode-time mixin in front of an ESPnet class, for in-place ``__class__`` swaps."""
from __future__ import annotations

from typing import Dict, Tuple

_CLASSES: Dict[Tuple[type, type], type] = {}


def in_front(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` first in its bases, one class per pair. Swapping a module's
    ``__class__`` to it changes behaviour without touching weights or the state dict, and
    ``isinstance`` checks against ESPnet's class still hold."""
    if (mixin, cls) not in _CLASSES:
        _CLASSES[mixin, cls] = type(f"{mixin.__name__.lstrip('_')}{cls.__name__}", (mixin, cls),
                                    {"__module__": mixin.__module__})
    return _CLASSES[mixin, cls]
