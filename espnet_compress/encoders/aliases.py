"""The registered names that predate composable features, kept so existing configs, checkpoints
and packed files load: each is the one host class with some features switched on by default.

=====================  ============================  ===================================
name                   host                          features on by default
=====================  ============================  ===================================
``quantized_<host>``   ``elastic_<host>``            ``quant_conf: {}`` (8-bit unless set)
``nested_<host>``      ``elastic_<host>``            ``quant_conf: {bits: 0}`` (fp, any width per system)
``foldable_<host>``    ``elastic_<host>``            ``fold: {}``
``searchable_<host>``  ``elastic_<host>``            ``search: {widths: U/4..U step U/8}``
=====================  ============================  ===================================

A user's block is merged over the default (``quant_conf: {method: lsq}`` on ``nested_conformer``
keeps ``bits: 0``). The parameters and module names are those of the host, so a checkpoint of an
alias loads into the host with the same blocks switched on, and vice versa.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping

from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder
from espnet_compress.encoders.wav2vec2 import ElasticWav2Vec2Encoder

#: alias prefix -> feature defaults
ALIAS_DEFAULTS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "quantized": {"quant_conf": {}},
    "nested": {"quant_conf": {"bits": 0}},
    "foldable": {"fold": {}},
    # candidate widths filled in from linear_units at build time (see make_alias)
    "searchable": {"search": {}},
}


def _merged(default: Mapping[str, Any], given: Any) -> Any:
    return dict(default) if given is None else ({**default, **given} if isinstance(given, Mapping) else given)


def default_search(search: Any, units: Any, host: type) -> Any:
    """``searchable_<host>`` searches widths ``U/4, 3U/8, ..., U`` (``U`` = the host's FFN width) when
    the block names neither widths, ranks nor a fixed architecture."""
    if not isinstance(search, Mapping) or {"widths", "ranks", "fixed"} & set(search):
        return search
    if units is None:
        units = inspect.signature(host.__init__).parameters.get(host.SHAPE_OPTIONS[1])
        units = getattr(units, "default", None)
        if units is None or units is inspect.Parameter.empty:
            return search
    return {**search, "widths": sorted({max(1, units * i // 8) for i in range(2, 9)})}


def make_alias(host: type, prefix: str, class_name: str) -> type:
    """``host`` with the features of ``ALIAS_DEFAULTS[prefix]`` on by default."""
    defaults = ALIAS_DEFAULTS[prefix]

    def __init__(self, input_size: int = 1, **options: Any) -> None:
        for key, default in defaults.items():
            options[key] = _merged(default, options.get(key))
        if prefix == "searchable":
            options["search"] = default_search(options["search"], options.get(host.SHAPE_OPTIONS[1]), host)
        host.__init__(self, input_size, **options)

    sig = inspect.signature(host.__init__)
    __init__.__signature__ = sig.replace(parameters=[
        p.replace(default=defaults[p.name]) if p.name in defaults else p for p in sig.parameters.values()
    ])
    doc = (f"``{prefix}_{host.FAMILY}``: ``elastic_{host.FAMILY}`` with "
           f"{', '.join(f'{k}: {v}' for k, v in defaults.items())} by default (see {host.__name__}).")
    return type(class_name, (host,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


QuantizedConformerEncoder = make_alias(ElasticConformerEncoder, "quantized", "QuantizedConformerEncoder")
NestedConformerEncoder = make_alias(ElasticConformerEncoder, "nested", "NestedConformerEncoder")
FoldableConformerEncoder = make_alias(ElasticConformerEncoder, "foldable", "FoldableConformerEncoder")
SearchableConformerEncoder = make_alias(ElasticConformerEncoder, "searchable", "SearchableConformerEncoder")
QuantizedWav2Vec2Encoder = make_alias(ElasticWav2Vec2Encoder, "quantized", "QuantizedWav2Vec2Encoder")
NestedWav2Vec2Encoder = make_alias(ElasticWav2Vec2Encoder, "nested", "NestedWav2Vec2Encoder")
FoldableWav2Vec2Encoder = make_alias(ElasticWav2Vec2Encoder, "foldable", "FoldableWav2Vec2Encoder")
