"""Features of the elastic encoder: each one an optional ``encoder_conf`` block that any host
(Conformer, wav2vec2/HuBERT) accepts and that composes with every other one.

A feature is a small object built from its config block. It hooks into the encoder at fixed
points (see :class:`~espnet_compress.features.base.EncoderFeature`): attach what it adds to the
built modules, complete the default plan, resolve its own plan keys (``depth`` for folding) and
check a plan against its rules. Adding a method is one new module here and one line in
:data:`FEATURES`; the hosts, the model, the system specs and the export pick it up from there.
"""
from __future__ import annotations

from typing import Dict, Tuple, Type

from espnet_compress.features.base import EncoderFeature
from espnet_compress.features.fold import FoldFeature
from espnet_compress.features.quantize import QuantizeFeature
from espnet_compress.features.search import SearchFeature

#: ``encoder_conf`` key -> feature class, in the order their hooks run. Quantization attaches last:
#: a derived search architecture (``search.fixed``) rebuilds FFN layers at their own sizes, and the
#: quantizers must go on those layers (searched architecture -> mixed precision -> QAT).
FEATURES: Dict[str, Type[EncoderFeature]] = {
    FoldFeature.KEY: FoldFeature,
    SearchFeature.KEY: SearchFeature,
    QuantizeFeature.KEY: QuantizeFeature,
}


def feature_plan_keys() -> Tuple[str, ...]:
    """Plan/system keys the features resolve (e.g. ``depth``, ``path_index``)."""
    return tuple(k for cls in FEATURES.values() for k in cls.PLAN_KEYS)


__all__ = ["FEATURES", "EncoderFeature", "feature_plan_keys"]
