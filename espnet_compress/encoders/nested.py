"""Nested configuration of any elastic encoder: the all-in-one supernet's encoder.

A nested encoder is a quantized encoder whose *default* plan is the largest system (every block,
full width, full precision) and whose quantizers accept every supported width, so that the
systems declared in ``model_conf.systems`` may pick any depth, width and precision without
further encoder options. ``quant_conf`` still narrows or tunes it (``method``, ``bit_choices``,
``exclude``); the systems themselves live in the model, which also owns the decoder's precision.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from espnet_compress.encoders.quantized import QuantizedEncoder


class NestedEncoder(QuantizedEncoder):
    """Mixin (listed before the elastic host class): ``quant_conf`` defaults to ``{bits: 0}``."""

    def __init__(self, *args: Any, quant_conf: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        conf = {"bits": 0, **(quant_conf or {})}
        super().__init__(*args, quant_conf=conf, **kwargs)
