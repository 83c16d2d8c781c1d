"""``quant_conf``: a weight quantizer on every Linear and Conv1d of the encoder.

Bit widths come from ``quant_conf.bits`` (a default plus overrides by module-name pattern) and are
part of the execution plan, so every system of a model can set its own (``bits`` in a system spec)
on the same weights. Typical use is QAT fine-tuning from an fp32 checkpoint (``--init_param``, or
asr.sh's ``--pretrained_model``): parameter names are the host's, so the checkpoint loads as is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

from espnet_compress.features.base import EncoderFeature
from espnet_compress.quant.api import QuantConfig, QuantConfigError, quantize_

if TYPE_CHECKING:
    from espnet_compress.encoders.elastic import ElasticEncoder


class QuantizeFeature(EncoderFeature):
    """Options of :class:`~espnet_compress.quant.api.QuantConfig`: ``bits``, ``method`` (one of
    :data:`~espnet_compress.quant.quantizers.QUANTIZERS`), ``per_channel``, ``bit_choices`` (every
    width a system may pick), ``exclude``, the layer-kind switches. The default plan's bits default
    to ``quant_conf.bits``."""

    KEY = "quant_conf"

    def __init__(self, conf: Optional[Mapping[str, Any]], where: str) -> None:
        super().__init__(conf, where)
        self.config = QuantConfig.from_config(self.conf, where)
        if self.config.ctc:
            raise QuantConfigError(f"{where}.ctc: the CTC projection is not part of the encoder; set "
                                   f"model_conf.decoder_quant.ctc instead")

    def attach(self, encoder: "ElasticEncoder") -> None:
        encoder.quant_config = self.config
        quantize_(encoder, self.config)

    def default_plan(self, encoder: "ElasticEncoder", plan: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if plan is not None and plan.get("bits") is not None:
            return plan
        return dict(plan or {}, bits=[list(rule) for rule in self.config.bits])
