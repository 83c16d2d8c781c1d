"""``quantized_conformer``: the elastic Conformer with a weight quantizer on every Linear and Conv1d.

Bit widths come from ``quant_conf.bits`` (a default plus overrides by module-name pattern) and are
part of the encoder's execution plan, so a nested or mixed-precision model can switch them per
forward pass. Typical use is QAT fine-tuning from an fp32 checkpoint (``--init_param``): the
parameter names are the stock Conformer's, so the checkpoint loads as is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from espnet_compress.core.plan import ExecutionPlan
from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder, PlanLike
from espnet_compress.quant.api import QuantConfig, quantize_
from espnet_compress.utils.signature import merge_signature


@merge_signature(ElasticConformerEncoder.__init__, skip=("self", "input_size"))
class QuantizedConformerEncoder(ElasticConformerEncoder):
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
        self._quant_conf = quant_conf
        super().__init__(input_size, plan=plan, **conformer_kwargs)

    def _prepare(self) -> None:
        self.quant_config = QuantConfig.from_config(self._quant_conf, "encoder_conf.quant_conf")
        quantize_(self, self.quant_config)

    def _default_plan(self, plan: PlanLike) -> PlanLike:
        default = ExecutionPlan.from_config(plan, self.num_physical_blocks)
        return default if default.bits else dataclasses.replace(default, bits=self.quant_config.bits)
