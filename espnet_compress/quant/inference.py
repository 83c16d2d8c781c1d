"""Turn a quantization-aware model into an inference model once its weights are final.

During QAT every forward re-quantizes each weight; a deployed model should not. At load of a packed
checkpoint each quantized layer is converted once to the fastest available CPU path:

* ``dequant``: a plain fp32 ``Linear``/``Conv1d`` holding codes x scale (always available);
* ``int8``: ``torch._weight_int8pack_mm`` (int8 weights, fp activations; exact for every width <= 8);
* ``int4``: ``torch._weight_int4pack_mm_for_cpu`` for widths <= 4 when the input size is a multiple
  of 32 (the kernel's group size) and the output size a multiple of 16.

``kernel="auto"`` times the candidate paths once per distinct layer shape on this machine and keeps
the fastest (low-bit kernels are not faster on every CPU/torch build: measured here, int8 weight-only
matmul was far slower than fp32 BLAS for Conformer-sized layers), and logs the choice.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.modules import QuantLinear

log = logging.getLogger(__name__)

KERNELS = ("auto", "dequant", "int8", "int4")


def _has_int8_kernel() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def _has_int4_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class Int8WeightLinear(torch.nn.Module):
    """Linear layer with int8 weight codes and per-output-channel fp scales (weight-only int8)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scale.float().expand(codes.shape[0]).contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def effective_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).float().contiguous(), self.codes, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def _int4_group_size(in_features: int) -> Optional[int]:
    return next((g for g in (256, 128, 64, 32) if in_features % g == 0), None)


class Int4WeightLinear(torch.nn.Module):
    """Linear layer with 4-bit packed weights (symmetric codes stored as uint4 = code + 8)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        n, k = codes.shape
        self.in_features, self.out_features = k, n
        self.group_size = _int4_group_size(k)
        if self.group_size is None:
            raise ValueError(f"int4 kernel needs in_features divisible by 32, got {k}")
        unsigned = (codes.to(torch.int32) + 8).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1))
        sz = torch.zeros(k // self.group_size, n, 2)
        sz[:, :, 0] = scale.float().expand(n)[None, :]
        self.register_buffer("scale_zeros", sz)
        self.register_buffer("codes_ref", codes.to(torch.int8))
        self.register_buffer("scale_ref", scale.float().expand(n).contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def effective_weight(self) -> torch.Tensor:
        return self.codes_ref.float() * self.scale_ref[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).float().contiguous(), self.packed, self.group_size, self.scale_zeros
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def _dequantized(module: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> torch.nn.Module:
    """Back to the plain torch class with the dequantized weight (computed once)."""
    w = module.weight_quantizer.decode(codes, scale, module.weight)
    del module.weight_quantizer
    module.__class__ = torch.nn.Linear if isinstance(module, QuantLinear) else torch.nn.Conv1d
    module.weight.data = w.to(module.weight.dtype)
    module.weight.requires_grad_(False)
    return module


def _candidates(module: torch.nn.Module, bits: int, kernel: str) -> Tuple[str, ...]:
    if not isinstance(module, QuantLinear) or kernel == "dequant":
        return ("dequant",)
    options = ["dequant"]
    if _has_int8_kernel():
        options.append("int8")
    if (bits <= 4 and _has_int4_kernel() and _int4_group_size(module.in_features) is not None
            and module.out_features % 16 == 0):
        options.append("int4")
    if kernel == "auto":
        return tuple(options)
    if kernel not in options:
        log.warning("kernel '%s' unavailable for a %dx%d %d-bit layer; using dequant",
                    kernel, module.out_features, module.in_features, bits)
        return ("dequant",)
    return (kernel,)


def _time(fn: Callable[[], torch.Tensor], repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _build(path: str, module: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> torch.nn.Module:
    bias = module.bias
    if path == "int8":
        return Int8WeightLinear(codes, scale, bias)
    if path == "int4":
        return Int4WeightLinear(codes, scale, bias)
    return _dequantized(module, codes, scale)


def freeze_for_inference(model: torch.nn.Module, kernel: str = "auto",
                         encodings: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None) -> Dict[str, str]:
    """Replace every quantized layer by its inference form; return {layer name: path chosen}.

    ``encodings`` (``<layer>.weight`` -> codes, scale) are the codes to compute with, e.g. those a
    packed file stores; layers without an entry encode their current weight.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}'; allowed: {list(KERNELS)}")
    chosen: Dict[str, str] = {}
    timing_cache: Dict[Tuple[int, int, int], str] = {}
    for name, module in quantized_modules(model).items():
        bits = module.bits
        if not bits:
            chosen[name] = "fp32 (not quantized)"
            continue
        if encodings is not None and f"{name}.weight" in encodings:
            codes, scale = encodings[f"{name}.weight"]
        else:
            with torch.no_grad():
                codes, scale = module.weight_quantizer.encode(module.weight, bits)
        options = _candidates(module, bits, kernel)
        if len(options) == 1:
            path = options[0]
        else:
            key = (module.out_features, module.in_features, bits)
            if key not in timing_cache:
                x = torch.randn(256, module.in_features)
                w = module.weight_quantizer.decode(codes, scale, module.weight)
                timings = {"dequant": _time(lambda: F.linear(x, w))}
                for opt in options[1:]:
                    candidate = _build(opt, module, codes, scale)
                    timings[opt] = _time(lambda: candidate(x))
                timing_cache[key] = min(timings, key=timings.get)
            path = timing_cache[key]
        replacement = _build(path, module, codes, scale)
        if replacement is not module:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        chosen[name] = path
    counts = Counter(chosen.values())
    log.info("espnet_compress inference paths: %s", ", ".join(f"{k}: {v} layers" for k, v in sorted(counts.items())))
    return chosen
