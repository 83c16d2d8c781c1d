"""``nested_conformer``: the all-in-one supernet's Conformer (systems in ``model_conf.systems``)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from espnet_compress.encoders.elastic import PlanLike
from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder
from espnet_compress.encoders.nested import NestedEncoder
from espnet_compress.utils.signature import merge_signature


@merge_signature(ElasticConformerEncoder.__init__, skip=("self", "input_size"))
class NestedConformerEncoder(NestedEncoder, ElasticConformerEncoder):
    """Conformer supernet: full precision by default, every weight quantizable at any supported
    width, so nested systems may choose depth (``blocks``), width (``ffn_units``) and ``bits``.

    Args:
        input_size: input feature dimension (given by ESPnet).
        plan: default plan (default: the largest system).
        quant_conf: as for ``quantized_conformer``; ``bits`` defaults to 0 (full precision).
        **conformer_kwargs: ESPnet ``ConformerEncoder`` options.
    """

    def __init__(self, input_size: int, plan: PlanLike = None,
                 quant_conf: Optional[Mapping[str, Any]] = None, **conformer_kwargs: Any) -> None:
        super().__init__(input_size, plan=plan, quant_conf=quant_conf, **conformer_kwargs)
