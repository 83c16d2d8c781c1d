"""Turn a quantization-aware model into an inference model once its weights are final.

During QAT every forward re-quantizes each weight; a deployed model should not. At load of a packed
checkpoint each quantized layer is converted once to the fastest available CPU path:

* ``dequant``: a plain fp32 ``Linear``/``Conv1d`` holding codes x scale (always available);
* ``int8``: ``torch._weight_int8pack_mm`` (int8 weights, fp activations; exact for every width <= 8);
* ``int4``: ``torch._weight_int4pack_mm_for_cpu`` for widths <= 4 when the input size is a multiple
  of 32 (the kernel's group size) and the output size a multiple of 16;
* ``qdyn``: int8 x int8 GEMM with dynamically quantized activations (fbgemm's
  ``quantized::linear_dynamic``, the kernel behind ESPnet's ``quantize_dynamic``). The file's codes
  (<= 8 bits, already integers) become the int8 weight as they are, with the file's scale(s): no
  re-quantization of the weight. Only the activations are rounded, per tensor and per call.

The weight-only kernels (``int8``/``int4``) are made for one-row LLM decoding and lose to fp32 BLAS
on Conformer shapes; the int8 x int8 GEMM is the one that can beat fp32 (measured 1.4-2.9x on
isolated 256x1024 .. 512x2048 layers, AVX2, one thread; inside the whole LibriSpeech-100 model
on the project's AVX2 machine it did not, see ``benchmarks/speed.py``). ``kernel="auto"`` times
the candidate paths once per distinct layer shape on this machine, keeps the fastest, and logs
the choice with the CPU's instruction set (:func:`cpu_features`). Only Linear layers have
integer kernels; Conv1d/Conv2d and Embedding layers are dequantized once at load (their file is
still packed).
"""
from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.modules import QuantLinear, detach_quantizer

log = logging.getLogger(__name__)

#: every value of ``kernel`` / ``ESPNET_COMPRESS_KERNEL``
KERNELS = ("auto", "dequant", "int8", "int4", "qdyn")


class KernelUnavailable(RuntimeError):
    """A forced kernel this CPU/torch build lacks, when falling back is not allowed."""


@functools.lru_cache(maxsize=1)
def cpu_features() -> str:
    """The instruction sets that decide which integer kernels are fast: torch's dispatch level
    (``get_cpu_capability``) plus AVX-512 / VNNI / AMX flags from ``/proc/cpuinfo`` (Linux)."""
    parts: List[str] = []
    try:
        parts.append(f"torch dispatch {torch.backends.cpu.get_cpu_capability()}")
    except AttributeError:  # older torch builds
        pass
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    wanted = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
              ("amx_int8", "AMX-INT8")]
    if flags:
        have = [label for flag, label in wanted if flag in flags]
        parts.append("cpu flags " + (", ".join(have) if have else "none of AVX2/AVX-512/VNNI/AMX"))
    return "; ".join(parts) or "unknown"


def _has_qdyn_kernel() -> bool:
    return (hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack")
            and "fbgemm" in torch.backends.quantized.supported_engines)


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


class DynamicInt8Linear(torch.nn.Module):
    """Linear layer on fbgemm's int8 x int8 GEMM with activations quantized per call.

    The weight is the stored codes as a ``qint8`` tensor (per-tensor or per-output-channel scale,
    zero point 0), so the weight computed with is exactly codes x scale. Activations are rounded
    to uint8 with a per-tensor scale from their min/max. ``reduce_range`` (7-bit activations)
    is needed only where AVX2's 16-bit pair sums could saturate (255 x 127 x 2 > 32767): codes of
    <= 7 bits (|code| <= 63 gives 255 x 63 x 2 < 32767) keep the full 8-bit activation range.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        codes = codes.to(torch.int8).contiguous()
        scale = scale.detach().float()
        if scale.dim() == 0:
            qweight = torch._make_per_tensor_quantized_tensor(codes, float(scale), 0)
        else:
            qweight = torch._make_per_channel_quantized_tensor(
                codes, scale.double(), torch.zeros(codes.shape[0], dtype=torch.long), 0)
        bias = None if bias is None else bias.detach().float().contiguous()
        self.reduce_range = bits == 8
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # kept for effective_weight/state_dict consumers (an elastic FFN run at a narrower width
        # computes with a slice of effective_weight and the bias); 1 byte per weight
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scale.expand(codes.shape[0]).contiguous())

    def effective_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), self._packed,
                                               self.reduce_range)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def _dequantized(module: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> torch.nn.Module:
    """Back to the plain torch class with the dequantized weight (computed once)."""
    w = module.weight_quantizer.decode(codes, scale, module.weight)
    detach_quantizer(module)
    module.weight.data = w.to(module.weight.dtype)
    module.weight.requires_grad_(False)
    return module


def _available(module: torch.nn.Module, bits: int) -> Dict[str, str]:
    """Kernel -> why it cannot run this layer ("" = it can)."""
    linear = isinstance(module, QuantLinear)
    why_not_linear = "" if linear else f"only Linear layers have integer kernels ({type(module).__name__})"
    return {
        "dequant": "",
        "int8": why_not_linear or ("" if _has_int8_kernel() else "torch has no _weight_int8pack_mm"),
        "int4": why_not_linear or (
            "torch has no _weight_int4pack_mm_for_cpu" if not _has_int4_kernel() else
            f"{bits}-bit codes (needs <= 4)" if bits > 4 else
            f"in_features {module.in_features} not a multiple of 32" if _int4_group_size(module.in_features) is None
            else f"out_features {module.out_features} not a multiple of 16" if module.out_features % 16 else ""),
        "qdyn": why_not_linear or (
            "" if _has_qdyn_kernel() else
            f"torch has no fbgemm quantized::linear_dynamic (engines {torch.backends.quantized.supported_engines})"),
    }


#: ``auto`` does not try ``qdyn`` below this many weights: quantizing the activations costs a pass
#: over them per call, which a small GEMM cannot win back (the tiny test models stay on exact paths)
QDYN_MIN_WEIGHTS = 256 * 256


def _candidates(module: torch.nn.Module, bits: int, kernel: str, strict: bool = False) -> Tuple[str, ...]:
    """Paths to try for one layer: every available one for ``auto``; else the forced one, or
    ``auto``'s candidates when it cannot run here (a warning names the reason and the fallback;
    ``strict`` raises :class:`KernelUnavailable` instead)."""
    available = _available(module, bits)
    options = tuple(k for k, why in available.items() if not why)
    if kernel == "auto":
        if isinstance(module, QuantLinear) and module.in_features * module.out_features < QDYN_MIN_WEIGHTS:
            options = tuple(k for k in options if k != "qdyn")
        return options
    if not available[kernel]:
        return (kernel,)
    is_linear = isinstance(module, QuantLinear)
    fallback = "auto (fastest measured of " + ", ".join(options) + ")" if len(options) > 1 else "dequant"
    message = (f"kernel '{kernel}' (ESPNET_COMPRESS_KERNEL) is unavailable for "
               + (f"a {module.out_features}x{module.in_features} {bits}-bit layer" if is_linear else "this layer")
               + f": {available[kernel]} [{cpu_features()}, torch {torch.__version__}]; falling back to {fallback}")
    if strict and is_linear:
        raise KernelUnavailable(message)
    if is_linear:
        log.warning(message)
    return options


def _time(fn: Callable[[], torch.Tensor], repeats: int = 7) -> float:
    """Fastest of ``repeats`` calls after a warm-up: the minimum is the least disturbed by other
    processes on a shared machine (a mean would pick whichever kernel ran during a quiet moment)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


#: ``auto`` keeps the fp path unless another one is at least this much faster (timing noise)
AUTO_MARGIN = 0.05


def _fastest(timings: Mapping[str, float]) -> str:
    best = min(timings, key=timings.get)
    if "dequant" in timings and timings[best] > (1 - AUTO_MARGIN) * timings["dequant"]:
        return "dequant"
    return best


def _build(path: str, module: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor,
           bits: int = 8) -> torch.nn.Module:
    bias = getattr(module, "bias", None)  # Embedding has none
    if path == "qdyn":
        return DynamicInt8Linear(codes, scale, bias, bits)
    if path == "int8":
        return Int8WeightLinear(codes, scale, bias)
    if path == "int4":
        return Int4WeightLinear(codes, scale, bias)
    return _dequantized(module, codes, scale)


def freeze_for_inference(model: torch.nn.Module, kernel: str = "auto",
                         encodings: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
                         strict: bool = False, batch_rows: int = 256) -> Dict[str, str]:
    """Replace every quantized layer by its inference form; return {layer name: path chosen}.

    ``encodings`` (``<layer>.weight`` -> codes, scale) are the codes to compute with, e.g. those a
    packed file stores; layers without an entry encode their current weight. ``strict``: a forced
    kernel that cannot run raises instead of falling back. ``batch_rows``: rows of the timing input
    for ``auto`` (about the frames of a 10 s utterance after 4x subsampling).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}' (ESPNET_COMPRESS_KERNEL); allowed: {list(KERNELS)}")
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
        options = _candidates(module, bits, kernel, strict)
        if len(options) == 1:
            path = options[0]
        else:
            key = (module.out_features, module.in_features, bits)
            if key not in timing_cache:
                x = torch.randn(batch_rows, module.in_features)
                w = module.weight_quantizer.decode(codes, scale, module.weight)
                timings = {"dequant": _time(lambda: F.linear(x, w))}
                for opt in options[1:]:
                    candidate = _build(opt, module, codes, scale, bits)
                    timings[opt] = _time(lambda: candidate(x))
                timing_cache[key] = _fastest(timings)
                log.info("kernel timing %dx%d %d-bit: %s -> %s", key[0], key[1], bits,
                         ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timings.items()), timing_cache[key])
            path = timing_cache[key]
        replacement = _build(path, module, codes, scale, bits)
        if replacement is not module:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        chosen[name] = path
    counts = Counter(chosen.values())
    log.info("espnet_compress inference paths (kernel=%s; %s): %s", kernel, cpu_features(), ", ".join(f"{k}: {v} layers" for k, v in sorted(counts.items())))
    return chosen
