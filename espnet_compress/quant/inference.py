"""Turn a quantization-aware model into an inference model once its weights are final.

During QAT every forward re-quantizes each weight; a deployed model should not. At load of a packed
checkpoint each quantized layer is converted once to the fastest available CPU path:

* ``dequant``: the plain fp32 ``Linear``/``Conv1d``/``Conv2d``/``Embedding`` holding codes x scale
  (always available);
* ``int8``: ``torch._weight_int8pack_mm`` (Linear; int8 weights, fp activations; exact for every
  width <= 8);
* ``int4``: ``torch._weight_int4pack_mm_for_cpu`` (Linear) for widths <= 4 when the input size is a
  multiple of 32 (the kernel's group size) and the output size a multiple of 16;
* ``qdyn``: int8 x int8 GEMM with dynamically quantized activations (fbgemm's
  ``quantized::linear_dynamic``, the kernel behind ESPnet's ``quantize_dynamic``). The file's codes
  (<= 8 bits, already integers) become the int8 weight as they are, with the file's scale(s): no
  re-quantization of the weight. Only the activations are rounded, per tensor and per call. Runs
  Linear layers, pointwise Conv1d (the convolution module's 1x1 convolutions: a Linear over
  channels) and Conv2d (the ``conv2d`` input layer, whose 256->256 3x3 convolution is the largest
  single layer of a Conformer encoder) as a GEMM over channels-last patches, in blocks of output
  rows so the patches stay in cache;
* ``im2col``: a Conv2d on the dequantized weight as an fp32 GEMM over channels-last patches (the
  front end's first convolution, one input channel, runs several times faster than in oneDNN);
* ``shiftadd``: a depthwise Conv1d (the convolution module's kernel-31 convolution) on the
  dequantized weight as K shifted multiply-adds: the same fp32 arithmetic, but 2-3x faster than
  the oneDNN depthwise convolution torch calls for one short sequence.

The weight-only kernels (``int8``/``int4``) are made for one-row LLM decoding and lose to fp32 BLAS
on Conformer shapes. The int8 x int8 GEMM is the one that beats fp32: 3-4x on isolated Conformer
layers of an AVX-512 VNNI CPU, 1.6-1.9x with the libraries capped at AVX2; a whole packed
LibriSpeech-100 encoder about 2.1x and 1.6x, side by side with stock fp32
(``benchmarks/speed.py --interleaved``, README).
``kernel="auto"`` times the candidate paths once per distinct layer shape on this machine, keeps
the fastest, and logs the choice with the CPU's instruction set (:func:`cpu_features`). Embedding
layers are dequantized once at load (their file is still packed).
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

from espnet_compress.env import isa_caps
from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.modules import QuantConv1d, QuantConv2d, QuantLinear, detach_quantizer

log = logging.getLogger(__name__)

#: every value of ``kernel`` / ``ESPNET_COMPRESS_KERNEL``
KERNELS = ("auto", "dequant", "int8", "int4", "qdyn", "shiftadd", "im2col")


class KernelUnavailable(RuntimeError):
    """A forced kernel this CPU/torch build lacks, when falling back is not allowed."""


@functools.lru_cache(maxsize=1)
def cpu_features() -> str:
    """The instruction sets that decide which integer kernels are fast: torch's dispatch level
    (``get_cpu_capability``), AVX-512 / VNNI / AMX flags from ``/proc/cpuinfo`` (Linux), and the
    libraries' instruction-set caps when set (:func:`espnet_compress.env.isa_caps`)."""
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
    caps = isa_caps()
    if caps:
        parts.append("capped by " + ", ".join(f"{k}={v}" for k, v in caps.items()))
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


def _prepacked(codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """fbgemm's packed int8 weight for a (out, in) code matrix: the codes as a ``qint8`` tensor
    (per-tensor or per-output-channel scale, zero point 0), so it computes with exactly codes x scale."""
    scale = scale.detach().float().reshape(-1)
    if scale.numel() == 1:
        qweight = torch._make_per_tensor_quantized_tensor(codes, float(scale), 0)
    else:
        qweight = torch._make_per_channel_quantized_tensor(
            codes, scale.double(), torch.zeros(codes.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qweight, bias)


class _DynamicInt8Base(torch.nn.Module):
    """Stored codes and scales of an int8 x int8 layer with activations quantized per call.

    Activations are rounded to uint8 with a per-tensor scale from their min/max. ``reduce_range``
    (7-bit activations) is needed only where AVX2's 16-bit pair sums could saturate
    (255 x 127 x 2 > 32767): codes of <= 7 bits (|code| <= 63 gives 255 x 63 x 2 < 32767) keep the
    full 8-bit activation range. ``codes``/``scales``/``bias`` stay as buffers for
    ``effective_weight`` and state_dict consumers (1 byte per weight).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                 gemm_codes: torch.Tensor) -> None:
        super().__init__()
        self.out_features = codes.shape[0]
        codes = codes.to(torch.int8).contiguous()
        scale = scale.detach().float()
        bias = None if bias is None else bias.detach().float().contiguous()
        self.reduce_range = bits == 8
        self._packed = _prepacked(gemm_codes.to(torch.int8).contiguous(), scale, bias)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scale.reshape(-1).expand(codes.shape[0]).contiguous())

    def effective_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scales.view(-1, *([1] * (self.codes.dim() - 1)))

    def _gemm(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(rows.float().contiguous(), self._packed, self.reduce_range)


class DynamicInt8Linear(_DynamicInt8Base):
    """Linear layer on fbgemm's int8 x int8 GEMM (see :class:`_DynamicInt8Base`)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], bits: int) -> None:
        super().__init__(codes, scale, bias, bits, gemm_codes=codes)
        self.in_features = codes.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._gemm(x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class DynamicInt8PointwiseConv1d(_DynamicInt8Base):
    """A 1x1 Conv1d (batch, channels, time) as the int8 GEMM over channels: a Linear per frame."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], bits: int) -> None:
        super().__init__(codes, scale, bias, bits, gemm_codes=codes[:, :, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, time_ = x.shape
        y = self._gemm(x.transpose(1, 2).reshape(-1, channels))
        return y.view(batch, time_, self.out_features).transpose(1, 2).to(x.dtype)


#: GEMM rows per block of a Conv2d computed over patches (whole output rows of the feature map): the
#: patches of a block (rows x 9 x 256 floats for the front end, about 1.4 MB) stay in L2; one GEMM
#: over the whole map streams ~40 MB of patches per 10 s of audio and ran 2x slower
CONV2D_BLOCK_ROWS = 160


def _conv2d_by_patches(x: torch.Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int],
                       padding: Tuple[int, int], out_channels: int,
                       gemm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A Conv2d (groups 1, dilation 1, zero padding) as ``gemm`` over channels-last patches.

    ``gemm`` maps (rows, kh * kw * in) patches to (rows, out), i.e. computes with the weight
    reordered to (out, kh, kw, in), so that each patch is a strided view of the channels-last input.
    Patches are gathered per block of output rows (``CONV2D_BLOCK_ROWS``). The output is NCHW in
    shape and channels-last in memory (what ESPnet's subsampling transposes to (batch, time,
    channels x freq) anyway), so a following convolution of this kind reads it without a copy.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    x = x.permute(0, 2, 3, 1)  # (batch, height, width, channels): free for a channels-last input
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    x = x.contiguous()
    batch, height, width, channels = x.shape
    out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
    out = x.new_empty(batch, out_h, out_w, out_channels)
    block = max(1, CONV2D_BLOCK_ROWS // out_w)
    sb, s_h, s_w, _ = x.stride()
    for b in range(batch):
        for h0 in range(0, out_h, block):
            n = min(block, out_h - h0)
            patches = x.as_strided((n, out_w, kh, kw, channels), (sh * s_h, sw * s_w, s_h, s_w, 1),
                                   x.storage_offset() + b * sb + h0 * sh * s_h)
            out[b, h0:h0 + n] = gemm(patches.reshape(n * out_w, -1)).view(n, out_w, -1)
    return out.permute(0, 3, 1, 2)


def _patch_major(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, kh * kw * in): the weight in the order of channels-last patches."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


class DynamicInt8Conv2d(_DynamicInt8Base):
    """A Conv2d (groups 1, dilation 1, zero padding) as the int8 GEMM over channels-last patches
    (:func:`_conv2d_by_patches`); each block of output rows gets its own activation scale."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                 stride: Tuple[int, int], padding: Tuple[int, int]) -> None:
        super().__init__(codes, scale, bias, bits, gemm_codes=_patch_major(codes))
        self.kernel_size = tuple(codes.shape[2:])
        self.stride, self.padding = tuple(stride), tuple(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv2d_by_patches(x, self.kernel_size, self.stride, self.padding, self.out_features, self._gemm)


class _FloatPath(torch.nn.Module):
    """A convolution on its fp32 (dequantized) weight by another algorithm than torch's; ``weight``
    and ``bias`` keep the convolution's names and shapes (state_dict consumers see a plain layer)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def effective_weight(self) -> torch.Tensor:
        return self.weight


class Im2colConv2d(_FloatPath):
    """A Conv2d as a BLAS GEMM over channels-last patches (:func:`_conv2d_by_patches`): the front
    end's first convolution has one input channel, a shape oneDNN runs at a few GFLOP/s; a 9-wide
    GEMM does not, and its channels-last output feeds the second convolution's patches without a
    reorder."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                 padding: Tuple[int, int]) -> None:
        super().__init__(weight, bias)
        self._gemm_weight = _patch_major(self.weight).t().contiguous()
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding = tuple(stride), tuple(padding)

    def _gemm(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self._gemm_weight if self.bias is None else torch.addmm(self.bias, rows, self._gemm_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv2d_by_patches(x.float(), self.kernel_size, self.stride, self.padding, self.weight.shape[0],
                                  self._gemm).to(x.dtype)


class ShiftAddDepthwiseConv1d(_FloatPath):
    """A depthwise Conv1d (stride 1, dilation 1, zero padding) as K shifted multiply-adds: the same
    arithmetic up to summation order, without oneDNN's per-call overhead, which dominates for one
    sequence of a few hundred frames."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int) -> None:
        super().__init__(weight, bias)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.weight.shape[-1]
        xp = F.pad(x, (self.padding, self.padding))
        steps = xp.shape[-1] - kernel + 1
        taps = self.weight[:, 0, :]  # (channels, kernel)
        out = xp.new_zeros(x.shape[0], x.shape[1], steps)
        if self.bias is not None:
            out += self.bias[:, None]
        for k in range(kernel):
            out.addcmul_(xp[..., k:k + steps], taps[:, k:k + 1])
        return out


def _decoded(module: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight the codes stand for (codes x scale, in the layer's weight layout)."""
    return module.weight_quantizer.decode(codes, scale, module.weight)


def _dequantized(module: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> torch.nn.Module:
    """Back to the plain torch class with the dequantized weight (computed once)."""
    w = _decoded(module, codes, scale)
    detach_quantizer(module)
    module.weight.data = w.to(module.weight.dtype)
    module.weight.requires_grad_(False)
    return module


def _is_pointwise_conv1d(module: torch.nn.Module) -> bool:
    return (isinstance(module, QuantConv1d) and module.kernel_size == (1,) and module.stride == (1,)
            and module.padding in ((0,), "valid") and module.dilation == (1,) and module.groups == 1)


def _is_depthwise_conv1d(module: torch.nn.Module) -> bool:
    return (isinstance(module, QuantConv1d) and module.groups == module.in_channels == module.out_channels
            and module.stride == (1,) and module.dilation == (1,) and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple))


def _is_gemm_conv2d(module: torch.nn.Module) -> bool:
    return (isinstance(module, QuantConv2d) and module.groups == 1 and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


#: kernel -> (does it apply to this kind of layer, the kinds it serves); a forced kernel that
#: applies but cannot run here (torch build, code width, shape) warns; one that does not apply to
#: a layer's kind silently leaves that layer to ``auto``
_KINDS: Dict[str, Tuple[Callable[[torch.nn.Module], bool], str]] = {
    "dequant": (lambda m: True, "every layer"),
    "int8": (lambda m: isinstance(m, QuantLinear), "Linear"),
    "int4": (lambda m: isinstance(m, QuantLinear), "Linear"),
    "qdyn": (lambda m: isinstance(m, QuantLinear) or _is_pointwise_conv1d(m) or _is_gemm_conv2d(m),
             "Linear, 1x1 Conv1d and Conv2d (groups 1, dilation 1, zero padding)"),
    "shiftadd": (_is_depthwise_conv1d, "depthwise Conv1d (stride 1, dilation 1, zero padding)"),
    "im2col": (_is_gemm_conv2d, "Conv2d (groups 1, dilation 1, zero padding)"),
}


def _available(module: torch.nn.Module, bits: int) -> Dict[str, str]:
    """Kernel -> why it cannot run this layer ("" = it can)."""
    kind = {k: "" if applies(module) else f"only {what} ({type(module).__name__})"
            for k, (applies, what) in _KINDS.items()}
    return {
        "dequant": "",
        "int8": kind["int8"] or ("" if _has_int8_kernel() else "torch has no _weight_int8pack_mm"),
        "int4": kind["int4"] or (
            "torch has no _weight_int4pack_mm_for_cpu" if not _has_int4_kernel() else
            f"{bits}-bit codes (needs <= 4)" if bits > 4 else
            f"in_features {module.in_features} not a multiple of 32" if _int4_group_size(module.in_features) is None
            else f"out_features {module.out_features} not a multiple of 16" if module.out_features % 16 else ""),
        "qdyn": kind["qdyn"] or (
            "" if _has_qdyn_kernel() else
            f"torch has no fbgemm quantized::linear_dynamic (engines {torch.backends.quantized.supported_engines})"),
        "shiftadd": kind["shiftadd"],
        "im2col": kind["im2col"],
    }


#: ``auto`` does not try ``qdyn`` below this many weights: quantizing the activations costs a pass
#: over them per call, which a small GEMM cannot win back (the tiny test models stay on exact
#: paths; so does the front end's first 1->256 convolution, 9 inputs per output)
QDYN_MIN_WEIGHTS = 256 * 256


def _describe(module: torch.nn.Module, bits: int) -> str:
    if isinstance(module, QuantLinear):
        return f"a {module.out_features}x{module.in_features} {bits}-bit layer"
    return f"a {bits}-bit {type(module).__name__} {tuple(module.weight.shape)}"


def _candidates(module: torch.nn.Module, bits: int, kernel: str, strict: bool = False) -> Tuple[str, ...]:
    """Paths to try for one layer: every available one for ``auto`` (``qdyn`` only from
    ``QDYN_MIN_WEIGHTS``); else the forced one, or ``auto``'s candidates when it cannot run here
    (a warning names the reason and the fallback; ``strict`` raises :class:`KernelUnavailable`
    instead) or does not serve this kind of layer (silently: forcing ``int8`` means int8 Linear
    layers, with the convolutions left to ``auto``)."""
    available = _available(module, bits)
    options = tuple(k for k, why in available.items() if not why
                    and not (k == "qdyn" and module.weight.numel() < QDYN_MIN_WEIGHTS))
    if kernel == "auto":
        return options
    if not available[kernel]:
        return (kernel,)
    if not _KINDS[kernel][0](module):
        return options
    fallback = "auto (fastest measured of " + ", ".join(options) + ")" if len(options) > 1 else "dequant"
    message = (f"kernel '{kernel}' (ESPNET_COMPRESS_KERNEL) is unavailable for {_describe(module, bits)}: "
               f"{available[kernel]} [{cpu_features()}, torch {torch.__version__}]; falling back to {fallback}")
    if strict:
        raise KernelUnavailable(message)
    log.warning(message)
    return options


def _time(candidates: Mapping[str, Callable[[], torch.Tensor]], repeats: int = 7) -> Dict[str, float]:
    """Fastest of ``repeats`` calls of each candidate after a warm-up, the candidates taking turns:
    the minimum is the least disturbed by other processes on a shared machine, and taking turns
    lets a disturbance hit every candidate alike instead of deciding the pick (timed one after the
    other, a busy second made whole groups of layers fall back to fp32, measured)."""
    for fn in candidates.values():
        fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


#: relative timing difference ``auto`` treats as a tie (timing noise)
AUTO_MARGIN = 0.05

#: paths that compute from the integer codes (1 byte or less per weight) rather than an fp32 copy
INTEGER_PATHS = frozenset({"qdyn", "int8", "int4"})


def _fastest(timings: Mapping[str, float]) -> str:
    """The path ``auto`` picks from one layer's timings.

    Among the fp32 paths, ``dequant`` (torch's own op) stays unless another is ``AUTO_MARGIN``
    faster. An integer path wins unless that fp32 pick is ``AUTO_MARGIN`` faster than it: the
    timing calls one layer over and over, so its fp32 weight stays in cache, while in the model
    every layer's weight is read cold and the integer path reads a quarter of the bytes. With ties
    going to fp32, the 256x256 layers of the LibriSpeech-100 encoder flipped between the paths from
    one load to the next at the AVX2 cap, and the encoder was faster with them on ``qdyn``
    (README, speed)."""
    floats = {k: v for k, v in timings.items() if k not in INTEGER_PATHS}
    best_float = min(floats, key=floats.get)
    if "dequant" in floats and floats[best_float] > (1 - AUTO_MARGIN) * floats["dequant"]:
        best_float = "dequant"
    integers = {k: v for k, v in timings.items() if k in INTEGER_PATHS}
    if integers:
        best_int = min(integers, key=integers.get)
        if floats[best_float] > (1 - AUTO_MARGIN) * integers[best_int]:
            return best_int
    return best_float


def _build(path: str, module: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor,
           bits: int = 8) -> torch.nn.Module:
    bias = getattr(module, "bias", None)  # Embedding has none
    if path == "qdyn":
        if isinstance(module, QuantConv2d):
            return DynamicInt8Conv2d(codes, scale, bias, bits, module.stride, module.padding)
        if isinstance(module, QuantConv1d):
            return DynamicInt8PointwiseConv1d(codes, scale, bias, bits)
        return DynamicInt8Linear(codes, scale, bias, bits)
    if path == "int8":
        return Int8WeightLinear(codes, scale, bias)
    if path == "int4":
        return Int4WeightLinear(codes, scale, bias)
    if path == "im2col":
        return Im2colConv2d(_decoded(module, codes, scale), bias, module.stride, module.padding)
    if path == "shiftadd":
        return ShiftAddDepthwiseConv1d(_decoded(module, codes, scale), bias, module.padding[0])
    return _dequantized(module, codes, scale)


#: feature dimension of the timing input of a one-channel Conv2d (the front end's first
#: convolution reads the 80-dim filterbank features of ESPnet's recipes)
_TIMING_FEATURES = 80


def _timing_key(module: torch.nn.Module) -> Tuple:
    """Layers with equal keys run the same kernels at the same speed: one timing serves them all."""
    return (type(module).__name__, tuple(module.weight.shape), getattr(module, "stride", None),
            getattr(module, "padding", None), module.bits)


def _timing_case(module: torch.nn.Module, w: torch.Tensor, batch_rows: int
                 ) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(a representative input, the fp32 forward with weight ``w``) of one layer.

    Conv2d layers are the ``conv2d`` input layer of the utterance ``batch_rows`` describes: the
    first convolution reads (4 x rows) frames of features, the second the (2 x rows) x
    (features / 2) map of the first. Sizes matter beyond FLOPs here: oneDNN's time for the first
    convolution grows faster than its output (a fresh 20 MB map per 10 s), which a small timing
    input hides."""
    if isinstance(module, QuantLinear):
        return torch.randn(batch_rows, module.in_features), lambda x: F.linear(x, w, module.bias)
    if isinstance(module, QuantConv1d):
        x = torch.randn(1, module.in_channels, batch_rows)
    elif module.in_channels == 1:
        x = torch.randn(1, 1, 4 * batch_rows, _TIMING_FEATURES)
    else:
        x = torch.randn(1, module.in_channels, 2 * batch_rows, _TIMING_FEATURES // 2)
    return x, lambda x: module._conv_forward(x, w, module.bias)


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
    timing_cache: Dict[Tuple, str] = {}
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
            key = _timing_key(module)
            if key not in timing_cache:
                x, fp32_forward = _timing_case(module, _decoded(module, codes, scale), batch_rows)
                runs: Dict[str, Callable[[], torch.Tensor]] = {"dequant": functools.partial(fp32_forward, x)}
                for opt in options[1:]:
                    runs[opt] = functools.partial(_build(opt, module, codes, scale, bits), x)
                with torch.no_grad():
                    timings = _time(runs)
                timing_cache[key] = _fastest(timings)
                log.info("kernel timing %s: %s -> %s", _describe(module, bits),
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
