"""Weight quantizers: small modules that fake-quantize a weight tensor at a switchable bit width.

One quantizer object serves every precision of the weight it guards (``set_bits``), because the
systems of a nested supernet evaluate the *same* weights at several precisions.
Each quantizer can also ``encode`` a weight to integer codes plus scales (what a packed checkpoint
stores) and ``decode`` them back; fake quantization in training is ``decode(encode(w))`` with a
straight-through estimator (STE), so a packed model computes what the QAT model computed.

Grids (``n`` bits, ``q = 2**(n-1) - 1``):

* symmetric uniform, n in {2, 3, 4, 5, 6, 8}: levels ``s * {0, +-1, ..., +-q}`` with step
  ``s = beta / q`` and ``beta = max|W|`` (per tensor, or per output channel). This is eq. 5-6 of the
  lossless 4-bit Conformer paper, whose table is written ``beta * {0, +-1, ..., +-(2^(n-1)-1)}`` with
  ``beta = max|W|``; read literally the largest level would be ``q * max|W|``, so we read beta as the
  range the grid spans (identical for n = 2, ternary ``beta * {-1, 0, 1}``).
* 1 bit: ``sign(W) * alpha`` with ``alpha = mean|W|`` (the L1-optimal binary scale), sign(0) = +1.
* learned scale (LSQ-style), any supported n: one learnable tensor-wise step per bit width;
  gradient of the step as in LSQ, scaled by ``1/sqrt(numel * q)``.
* std-alpha (:class:`StdScaleQuantizer`, the one-bit ASR method): step ``alpha_n * s``, ``s =
  min(2 std(W), 1)`` at 1-2 bits (``max|W| / q`` wider), one learnable ``alpha_n`` per width.
* bit-plane (:class:`BitPlaneQuantizer`, MatQuant's nesting for a symmetric grid): every width is
  the top bits of the widest width's codes (:func:`slice_codes`), so one stored set of codes holds
  every precision of a nested supernet.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch

#: Bit widths a weight can be quantized to (0 = full precision, no quantizer effect).
SUPPORTED_BITS: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)


class UnsupportedBitWidth(ValueError):
    """A bit width the quantizers do not implement; the message lists the allowed ones."""


def check_bits(bits: int, where: str = "") -> int:
    """Validate a bit width (0 = full precision) and return it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or (bits != 0 and bits not in SUPPORTED_BITS):
        place = f" for {where}" if where else ""
        raise UnsupportedBitWidth(
            f"unsupported bit width {bits!r}{place}; allowed: {list(SUPPORTED_BITS)} (0 = full precision)"
        )
    return bits


def qmax(bits: int) -> int:
    """Largest integer code of the symmetric n-bit grid (1 for both binary and ternary)."""
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


class _StraightThrough(torch.autograd.Function):
    """Forward exactly ``w_hat``, backward identity to ``w``. The usual ``w + (w_hat - w).detach()``
    rounds twice, so its forward is not bit-exact to ``w_hat`` (nor to what a packed model
    computes from the same codes)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        return w_hat.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _ste(w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """Forward ``w_hat``, backward identity to ``w`` (straight-through estimator)."""
    return _StraightThrough.apply(w, w_hat)


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-output-channel vector to broadcast against a Linear/Conv weight."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


class WeightQuantizer(torch.nn.Module):
    """Base class: precision switchable at run time; ``bits == 0`` passes the weight through.

    ``whole_tensor`` (class attribute): a narrowed layer (elastic FFN) reads a slice of the codes
    of the *whole* weight instead of quantizing its slice on its own. Quantizers whose codes must
    be the same for every system that shares them (bit planes) set it.
    """

    whole_tensor = False

    def __init__(self, bit_choices: Iterable[int] = SUPPORTED_BITS) -> None:
        super().__init__()
        self.bit_choices = tuple(sorted({check_bits(b) for b in bit_choices if b}))
        self.bits = 0

    def set_bits(self, bits: int) -> None:
        check_bits(bits)
        if bits and bits not in self.bit_choices:
            raise UnsupportedBitWidth(
                f"{type(self).__name__} was built for bit widths {list(self.bit_choices)}, not {bits}"
            )
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits == 0:
            return w
        return self.fake_quantize(w, self.bits)

    def fake_quantize(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        codes, scale = self.encode(w, bits)
        return _ste(w, self.decode(codes, scale, w))

    def encode(self, w: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Integer codes in ``[-qmax, qmax]`` (int8) and the float scale (step) to multiply them by."""
        raise NotImplementedError

    @staticmethod
    def decode(codes: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Dequantize: codes times scale (a scalar, or one scale per output channel)."""
        s = scale if scale.dim() == 0 else _channel_view(scale, like)
        return codes.to(s.dtype) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bit_choices={list(self.bit_choices)}"


class MaxScaleQuantizer(WeightQuantizer):
    """Symmetric uniform (n >= 2) and sign (n = 1) quantizer whose scale follows the weight.

    No learnable state: the scale is recomputed from the weight on every call and treated as a
    constant by autograd (the usual QAT choice), so a checkpoint of this quantizer is the fp weight.
    """

    def __init__(self, bit_choices: Iterable[int] = SUPPORTED_BITS, per_channel: bool = False) -> None:
        super().__init__(bit_choices)
        self.per_channel = per_channel

    def _reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        if not self.per_channel:
            return getattr(x, op)()
        flat = x.reshape(x.shape[0], -1)
        return flat.amax(dim=1) if op == "max" else flat.mean(dim=1)

    def encode(self, w: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
        w = w.detach()
        if bits == 1:
            scale = self._reduce(w.abs(), "mean")
            codes = torch.where(w >= 0, 1, -1).to(torch.int8)
            return codes, scale
        q = qmax(bits)
        beta = self._reduce(w.abs(), "max")
        scale = torch.where(beta > 0, beta / q, torch.ones_like(beta))
        s = scale if scale.dim() == 0 else _channel_view(scale, w)
        codes = torch.clamp(torch.round(w / s), -q, q).to(torch.int8)
        return codes, scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per_channel={self.per_channel}"


class _LsqRound(torch.autograd.Function):
    """LSQ: forward ``s * clamp(round(w/s))``; backward STE for ``w`` inside the range and the LSQ
    step gradient for ``s`` (``round(v) - v`` inside, ``+-q`` outside), scaled by ``g``."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, bits: int, g: float) -> torch.Tensor:
        v = w / s
        q = qmax(bits)
        if bits == 1:
            code = torch.where(v >= 0, 1.0, -1.0).to(w.dtype)
            inside = v.abs() <= 1
        else:
            code = torch.clamp(torch.round(v), -q, q)
            inside = v.abs() <= q
        ctx.save_for_backward(v, code, inside)
        ctx.g = g
        return code * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, code, inside = ctx.saved_tensors
        grad_w = grad * inside.to(grad.dtype)
        ds = torch.where(inside, code - v, code)
        grad_s = (grad * ds).sum() * ctx.g
        return grad_w, grad_s.reshape(()), None, None


class LearnedScaleQuantizer(WeightQuantizer):
    """Tensor-wise learnable step per bit width (LSQ-style), as in the one-bit ASR method.

    Steps are parameters named ``step_<n>bit`` so an optimizer trains them with the weights.
    They are initialised from the weight on the first forward (after any checkpoint was loaded):
    ``mean|W|`` for 1 bit, ``2 mean|W| / sqrt(q)`` otherwise (the LSQ initialisation). A step the
    optimizer pushes to zero or below is used as ``MIN_STEP`` in the forward (the gradient still
    reaches the parameter, so it can recover), and a packed file stores what the forward used.
    """

    MIN_STEP = 1e-8

    def __init__(self, bit_choices: Iterable[int] = SUPPORTED_BITS) -> None:
        super().__init__(bit_choices)
        self.steps = torch.nn.ParameterDict(
            {f"step_{b}bit": torch.nn.Parameter(torch.tensor(1.0)) for b in self.bit_choices}
        )
        self.register_buffer("initialized", torch.zeros(len(self.bit_choices), dtype=torch.bool))

    def step(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        idx = self.bit_choices.index(bits)
        p = self.steps[f"step_{bits}bit"]
        if not bool(self.initialized[idx]):
            with torch.no_grad():
                m = w.detach().abs().mean()
                p.copy_(m if bits == 1 else 2 * m / math.sqrt(qmax(bits)))
                p.clamp_(min=self.MIN_STEP)
                self.initialized[idx] = True
        # value clamped, gradient straight through (a plain clamp would stop it below MIN_STEP)
        return _ste(p, p.clamp(min=self.MIN_STEP))

    def fake_quantize(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        s = self.step(w, bits)
        g = 1.0 / math.sqrt(w.numel() * qmax(bits))
        return _LsqRound.apply(w, s, bits, g)

    def encode(self, w: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.step(w, bits).detach()
        v = w.detach() / s
        if bits == 1:
            codes = torch.where(v >= 0, 1, -1)
        else:
            q = qmax(bits)
            codes = torch.clamp(torch.round(v), -q, q)
        return codes.to(torch.int8), s.clone()


class _AlphaScaledRound(torch.autograd.Function):
    """Forward ``step * code(w / step)`` with ``step = alpha * base``; backward as the one-bit ASR
    authors' code: identity to ``w`` (no clip mask), and to ``alpha`` the LSQ-like
    ``sum(grad * (code - u))`` inside the grid's range and ``sum(grad * code)`` outside it (``u = w / step``),
    without the ``base`` factor or LSQ's gradient scale (what the released QACT code does)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, alpha: torch.Tensor, base: torch.Tensor, bits: int) -> torch.Tensor:
        step = alpha * base
        u = w / step
        code, inside = _grid_codes(u, bits)
        ctx.save_for_backward(u, code, inside)
        return code * step

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, code, inside = ctx.saved_tensors
        grad_alpha = (grad * torch.where(inside, code - u, code)).sum()
        return grad, grad_alpha.reshape(()), None, None


def _grid_codes(u: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``u`` (weights in units of the step) on the symmetric grid, as floats, and the mask
    of values inside the grid's range. 1 bit: ``sign(u)`` with sign(0) = +1 (the packed format's
    two codes); n >= 2: ``clamp(round(u), -q, q)`` (ternary {-1, 0, +1} at 2 bits)."""
    q = qmax(bits)
    if bits == 1:
        code = torch.where(u >= 0, 1.0, -1.0).to(u.dtype)
    else:
        code = torch.clamp(torch.round(u), -q, q)
    return code, u.abs() <= q


class StdScaleQuantizer(WeightQuantizer):
    """The one-bit/two-bit ASR quantizer (Li et al., Interspeech 2025; the authors' QACT code):
    step ``alpha_n * s`` with one learnable ``alpha_n`` per bit width and per tensor (initialised to
    1) times a scale recomputed from the weight on every forward:

    * n <= 2: ``s = min(2 * std(W), 1)`` (shared by the 1- and 2-bit grids); 2 bits is ternary
      ``{-alpha s, 0, +alpha s}``, 1 bit ``sign(W) * alpha * s``;
    * n >= 3: ``s = max|W| / q`` (the authors keep the conv module at 4 bits with this scale and a
      learnable ``alpha_4``; the same rule serves any wider grid, e.g. a 4-bit decoder).

    Why a learnable factor on a weight-derived scale rather than a free LSQ step: the scale follows
    the weight's spread as training moves it, and ``alpha`` only learns the correction per
    precision, so one weight set can serve 2 and 1 bit at once (co-training) with a step each.
    Gradients (:class:`_AlphaScaledRound`): identity STE for W, LSQ-like for alpha. A factor the
    optimizer pushes to zero or below is used as ``MIN_ALPHA`` in the forward (its gradient still
    flows). ``encode`` returns codes and the scalar step ``alpha * s``; a packed file stores those,
    and the ``alpha_<n>bit`` parameters as raw tensors.
    """

    MIN_ALPHA = 1e-4

    def __init__(self, bit_choices: Iterable[int] = SUPPORTED_BITS) -> None:
        super().__init__(bit_choices)
        self.alphas = torch.nn.ParameterDict(
            {f"alpha_{b}bit": torch.nn.Parameter(torch.tensor(1.0)) for b in self.bit_choices}
        )

    @staticmethod
    def base_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
        """``s`` of the step (no gradient: a statistic of the weight, as in the authors' code)."""
        w = w.detach()
        if bits <= 2:
            s = torch.clamp(2 * w.std(), max=1.0) if w.numel() > 1 else w.abs().reshape(())
        else:
            s = w.abs().max() / qmax(bits)
        return torch.where(s > 0, s, torch.ones_like(s))

    def alpha(self, bits: int) -> torch.Tensor:
        p = self.alphas[f"alpha_{bits}bit"]
        # value clamped, gradient straight through (a plain clamp would stop it below MIN_ALPHA)
        return _ste(p, p.clamp(min=self.MIN_ALPHA))

    def fake_quantize(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        return _AlphaScaledRound.apply(w, self.alpha(bits), self.base_scale(w, bits), bits)

    def encode(self, w: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
        step = (self.alpha(bits) * self.base_scale(w, bits)).detach()
        code, _ = _grid_codes(w.detach() / step, bits)
        return code.to(torch.int8), step.clone()


def slice_codes(codes: torch.Tensor, from_bits: int, to_bits: int) -> torch.Tensor:
    """The ``to_bits`` codes nested in symmetric ``from_bits`` codes: the top bits of the
    magnitude, rounded half away from zero on the first dropped bit, clamped to the narrower grid
    (``|c| >> k`` with rounding, ``k = from_bits - to_bits``). Integer arithmetic only, and odd
    (``slice(-c) = -slice(c)``), so the narrow grid stays symmetric like the wide one. The narrow
    code ``c'`` stands for ``c' * 2**k`` wide steps."""
    if not 2 <= to_bits <= from_bits:
        raise UnsupportedBitWidth(f"cannot slice {from_bits}-bit codes to {to_bits} bits (need 2 <= {to_bits} <= {from_bits})")
    shift = from_bits - to_bits
    if shift == 0:
        return codes
    wide = codes.to(torch.int16)
    mag = torch.clamp((wide.abs() + (1 << (shift - 1))) >> shift, max=qmax(to_bits))
    return (torch.sign(wide) * mag).to(torch.int8)


class BitPlaneQuantizer(MaxScaleQuantizer):
    """Nested bit planes (MatQuant, Nair et al. 2025, on a symmetric grid): the widest width ``M``
    of ``bit_choices`` is max-scaled as :class:`MaxScaleQuantizer` does, and every narrower width
    ``n`` is :func:`slice_codes` of those codes with step ``s_M * 2**(M - n)``.

    Why: a supernet whose systems differ in precision then trains its 4- and 2-bit systems on
    exactly the codes an ``M``-bit file stores, so one packed file at ``M`` bits decodes every
    system. The narrow grids are not the ones a direct n-bit max-scale would pick (at ``M = 8``,
    4 bits spans ``112/127`` of ``max|W|`` and the 2-bit levels sit at ``64/127`` of it); co-training adapts
    the weights to them. 1 bit (a sign plane with its own mean scale) does not nest and is refused.
    Whole-tensor: a narrowed FFN reads a slice of the whole weight's codes.
    """

    whole_tensor = True

    def __init__(self, bit_choices: Iterable[int] = SUPPORTED_BITS, per_channel: bool = False) -> None:
        super().__init__(bit_choices, per_channel=per_channel)
        if 1 in self.bit_choices:
            raise UnsupportedBitWidth(f"bit-plane quantization nests widths >= 2 only, got bit choices "
                                      f"{list(self.bit_choices)} (1 bit is a sign with its own scale)")

    @property
    def master_bits(self) -> int:
        """The stored width: every other width is sliced from its codes."""
        return self.bit_choices[-1]

    def encode(self, w: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
        codes, scale = super().encode(w, self.master_bits)
        return self.narrow(codes, scale, bits)

    def narrow(self, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scale)`` at ``bits`` from the master width's ``(codes, scale)``."""
        shift = self.master_bits - bits
        return slice_codes(codes, self.master_bits, bits), scale * float(2 ** shift)


QUANTIZERS: Dict[str, type] = {"max": MaxScaleQuantizer, "lsq": LearnedScaleQuantizer, "std_alpha": StdScaleQuantizer,
                               "bitplane": BitPlaneQuantizer}
