"""``foldable_conformer``: a seed of ``num_blocks`` Conformer blocks unfolded to a logical depth."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from espnet_compress.encoders.elastic import PlanLike
from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder
from espnet_compress.encoders.foldable import FoldableEncoder
from espnet_compress.utils.signature import merge_signature


@merge_signature(ElasticConformerEncoder.__init__, skip=("self", "input_size"))
class FoldableConformerEncoder(FoldableEncoder, ElasticConformerEncoder):
    """Conformer encoder whose ``num_blocks`` physical blocks are reused to any logical depth.

    Args:
        input_size: input feature dimension (given by ESPnet).
        fold: ``depth`` (default logical depth, default ``num_blocks``), ``order``
            (``in_place`` | ``cycle``, how repeats run) and ``unfold_last`` (only the last m blocks
            may repeat; default all).
        plan: default plan (overrides ``fold.depth``); accepts ``depth``/``path_index``.
        **conformer_kwargs: ESPnet ``ConformerEncoder`` options (``num_blocks`` = seed size).
    """

    def __init__(self, input_size: int, fold: Optional[Mapping[str, Any]] = None, plan: PlanLike = None,
                 **conformer_kwargs: Any) -> None:
        super().__init__(input_size, fold=fold, plan=plan, **conformer_kwargs)
