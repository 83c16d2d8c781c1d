"""Quantized configuration of any elastic encoder: a weight quantizer on every Linear and Conv1d.

Bit widths come from ``quant_conf.bits`` (a default plus overrides by module-name pattern) and are
part of the encoder's execution plan, so a nested model can switch them per forward pass. Typical use is QAT fine-tuning from an fp32 checkpoint (``--init_param``): the
parameter names are the host's, so the checkpoint loads as is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from espnet_compress.core.plan import ExecutionPlan
from espnet_compress.encoders.elastic import PlanLike
from espnet_compress.quant.api import QuantConfig, quantize_


class QuantizedEncoder:
    """Mixin (listed before the elastic host class): ``quant_conf`` options of
    :class:`~espnet_compress.quant.api.QuantConfig` (``bits``, ``method`` = ``max`` | ``lsq``,
    ``per_channel``, ``bit_choices``, ``exclude``); the default plan's bits default to
    ``quant_conf.bits``."""

    def __init__(self, *args: Any, quant_conf: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        self._quant_conf = quant_conf
        super().__init__(*args, **kwargs)

    def _prepare(self) -> None:
        super()._prepare()
        self.quant_config = QuantConfig.from_config(self._quant_conf, "encoder_conf.quant_conf")
        quantize_(self, self.quant_config)

    def _default_plan(self, plan: PlanLike) -> PlanLike:
        default = ExecutionPlan.from_config(super()._default_plan(plan), self.num_physical_blocks)
        return default if default.bits else dataclasses.replace(default, bits=self.quant_config.bits)
