"""``compressed``: ESPnet's hybrid CTC/attention model with a quantization-aware decoder.

The lossless 4-bit paper quantizes encoder *and* decoder; ESPnet builds the decoder from its own
``decoder_choices``, so decoder quantization is a model option applied after ESPnet built the parts.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from espnet2.asr.espnet_model import ESPnetASRModel

from espnet_compress.quant.api import QuantConfig, quantize_
from espnet_compress.quant.inference import freeze_for_inference
from espnet_compress.quant.packed import PackedModelError, is_packed, unpack_state_dict
from espnet_compress.utils.signature import merge_signature, reject_unknown_options


@merge_signature(ESPnetASRModel.__init__)
class CompressedASRModel(ESPnetASRModel):
    """``ESPnetASRModel`` plus compression options (``model_conf``).

    Args:
        decoder_quant: :class:`~espnet_compress.quant.api.QuantConfig` options for every Linear of
            the decoder (attention projections, FFNs, output layer); the token embedding stays fp32.
            ``None`` keeps the decoder in full precision.
        **espnet_kwargs: every ``ESPnetASRModel`` option (``ctc_weight``, ``lsm_weight``, ...).
    """

    def __init__(self, *args: Any, decoder_quant: Optional[Mapping[str, Any]] = None, **espnet_kwargs: Any) -> None:
        reject_unknown_options(type(self), espnet_kwargs, "model_conf")
        super().__init__(*args, **espnet_kwargs)
        self.decoder_quant = None
        if decoder_quant is not None:
            if self.decoder is None:
                raise ValueError("model_conf.decoder_quant is set but the model has no decoder")
            self.decoder_quant = QuantConfig.from_config(decoder_quant, "model_conf.decoder_quant")
            quantize_(self.decoder, self.decoder_quant)
        self._packed_header: Optional[Dict[str, Any]] = None
        self._register_load_state_dict_pre_hook(self._unpack_packed_state, with_module=False)
        self.register_load_state_dict_post_hook(self._freeze_after_packed_load)

    # ------------------------------------------------------------------ packed checkpoints
    def _unpack_packed_state(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """Expand a packed checkpoint in place, so stock ``load_state_dict`` (and hence
        ``Speech2Text``/``asr_inference``, which load with ``strict=False``) sees float weights.
        Every parameter must be present: a silent partial load would decode with random weights."""
        if prefix or not is_packed(state_dict):
            return
        tensors, header = unpack_state_dict(state_dict, "packed checkpoint")
        expected = set(self.state_dict())
        missing: List[str] = sorted(expected - set(tensors))
        extra: List[str] = sorted(set(tensors) - expected)
        if missing or extra:
            raise PackedModelError(
                f"packed checkpoint does not match the model built from its config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        state_dict.clear()
        state_dict.update(tensors)
        self._packed_header = header

    def _freeze_after_packed_load(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        """A packed model is a deployment model: quantize each weight once, pick the CPU kernel
        (``ESPNET_COMPRESS_KERNEL`` = auto | dequant | int8 | int4; default auto)."""
        if self._packed_header is None:
            return
        self.inference_paths = freeze_for_inference(self, os.environ.get("ESPNET_COMPRESS_KERNEL", "auto"))
        self._packed_header = None
        logging.getLogger(__name__).info("loaded packed checkpoint; quantized layers frozen for inference")
