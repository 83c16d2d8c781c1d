"""Linear and Conv1d layers whose weight passes through a switchable :mod:`quantizer <.quantizers>`.

Like the elastic modules, they are ESPnet's/torch's own classes converted in place: the parameter
``weight`` keeps its name and identity (optimizer state, checkpoints and ``--init_param`` keep
working), and the quantizer is a child module named ``weight_quantizer``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from espnet_compress.quant.quantizers import WeightQuantizer


class QuantMixin:
    """Shared behaviour: ``effective_weight`` (the fake-quantized weight) and ``set_bits``."""

    weight: torch.nn.Parameter
    weight_quantizer: WeightQuantizer

    def effective_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def set_bits(self, bits: int) -> None:
        self.weight_quantizer.set_bits(bits)

    @property
    def bits(self) -> int:
        return self.weight_quantizer.bits


class QuantLinear(QuantMixin, torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class QuantConv1d(QuantMixin, torch.nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


_SWAP = {torch.nn.Linear: QuantLinear, torch.nn.Conv1d: QuantConv1d}


def attach_quantizer(module: torch.nn.Module, quantizer: WeightQuantizer) -> torch.nn.Module:
    """Convert a plain ``nn.Linear``/``nn.Conv1d`` in place into its quantized twin."""
    target = _SWAP.get(type(module))
    if target is None:
        raise TypeError(f"cannot quantize {type(module).__name__}; supported: Linear, Conv1d")
    module.__class__ = target
    module.weight_quantizer = quantizer.to(module.weight.device)
    return module


def is_quantizable(module: torch.nn.Module) -> bool:
    return type(module) in _SWAP
