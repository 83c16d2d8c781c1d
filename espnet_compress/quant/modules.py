"""Linear, Conv1d, Conv2d and Embedding layers whose weight passes through a switchable :mod:`quantizer <.quantizers>`.

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


class QuantConv2d(QuantMixin, torch.nn.Conv2d):
    """The Conv2d input layer (ESPnet's ``conv2d`` subsampling): about as many MACs as all the
    FFNs of a Conformer and, at fp32, the largest tensor group left in a 4-bit file's front end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class QuantEmbedding(QuantMixin, torch.nn.Embedding):
    """Token embedding; an output "channel" is one token's row, so per-channel = per-token scales."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.effective_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


#: layer kind (the name ``QuantConfig`` options use) -> (torch class, quantized twin); the one list
#: of what can be quantized
LAYER_KINDS = {
    "linear": (torch.nn.Linear, QuantLinear),
    "conv1d": (torch.nn.Conv1d, QuantConv1d),
    "conv2d": (torch.nn.Conv2d, QuantConv2d),
    "embedding": (torch.nn.Embedding, QuantEmbedding),
}
_SWAP = {plain: quant for plain, quant in LAYER_KINDS.values()}
_UNSWAP = {quant: plain for plain, quant in LAYER_KINDS.values()}


def layer_kind(module: torch.nn.Module) -> str:
    """The ``LAYER_KINDS`` name of a plain or quantized layer ("" for anything else)."""
    cls = _UNSWAP.get(type(module), type(module))
    return next((k for k, (plain, _) in LAYER_KINDS.items() if plain is cls), "")


def attach_quantizer(module: torch.nn.Module, quantizer: WeightQuantizer) -> torch.nn.Module:
    """Convert a plain layer of ``LAYER_KINDS`` in place into its quantized twin."""
    target = _SWAP.get(type(module))
    if target is None:
        raise TypeError(f"cannot quantize {type(module).__name__}; supported: {sorted(LAYER_KINDS)}")
    module.__class__ = target
    module.weight_quantizer = quantizer.to(module.weight.device)
    return module


def detach_quantizer(module: torch.nn.Module) -> torch.nn.Module:
    """Back to the plain torch class (the weight stays as it is); used when freezing for inference."""
    del module.weight_quantizer
    module.__class__ = _UNSWAP[type(module)]
    return module


def is_quantizable(module: torch.nn.Module) -> bool:
    return type(module) in _SWAP
