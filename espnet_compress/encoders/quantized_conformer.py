"""``quantized_conformer``: the elastic Conformer with quantization-aware weights."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from espnet_compress.encoders.elastic import PlanLike
from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder
from espnet_compress.encoders.quantized import QuantizedEncoder
from espnet_compress.utils.signature import merge_signature


@merge_signature(ElasticConformerEncoder.__init__, skip=("self", "input_size"))
class QuantizedConformerEncoder(QuantizedEncoder, ElasticConformerEncoder):
    """Conformer encoder with quantization-aware weights.

    Args:
        input_size: input feature dimension (given by ESPnet).
        plan: default execution plan; its ``bits`` default to ``quant_conf.bits``.
        quant_conf: :class:`~espnet_compress.quant.api.QuantConfig` options: ``bits``, ``method``
            (``max`` | ``lsq``), ``per_channel``, ``bit_choices``, ``exclude``.
        **conformer_kwargs: ESPnet ``ConformerEncoder`` options.
    """

    def __init__(self, input_size: int, plan: PlanLike = None,
                 quant_conf: Optional[Mapping[str, Any]] = None, **conformer_kwargs: Any) -> None:
        super().__init__(input_size, plan=plan, quant_conf=quant_conf, **conformer_kwargs)
