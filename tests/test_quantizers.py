"""Weight quantizers: level sets follow the documented formulas exactly, gradients are the STE/LSQ
ones, and one quantizer switches precision on the same weights at run time."""
from __future__ import annotations

import math
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

from espnet_compress.quant.api import QuantConfig, quantize_, set_bits
from espnet_compress.quant.quantizers import (
    SUPPORTED_BITS,
    LearnedScaleQuantizer,
    MaxScaleQuantizer,
    UnsupportedBitWidth,
    check_bits,
)

MULTI_BIT = [b for b in SUPPORTED_BITS if b >= 2]
ALLOWED = r"allowed: \[1, 2, 3, 4, 5, 6, 8\]"


def _weight(shape: Tuple[int, ...] = (16, 24), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _dequantized(qz: MaxScaleQuantizer, w: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scale = qz.encode(w, bits)
    return qz.decode(codes, scale, w)


# ---------------------------------------------------------------------------------- level sets
@pytest.mark.parametrize("bits", MULTI_BIT)
def test_max_scale_levels_are_the_symmetric_grid(bits):
    w = _weight()
    qz = MaxScaleQuantizer()
    q = 2 ** (bits - 1) - 1
    step = w.abs().max() / q
    deq = _dequantized(qz, w, bits)
    # Independent restatement of eq. 5-6: s = max|W| / q, codes = clamp(round(W / s), -q, q).
    torch.testing.assert_close(deq, torch.clamp(torch.round(w / step), -q, q) * step, rtol=0, atol=0)
    grid = set((torch.arange(-q, q + 1, dtype=torch.float32) * step).tolist())
    assert set(deq.unique().tolist()) <= grid
    assert math.isclose(deq.abs().max().item(), w.abs().max().item(), rel_tol=1e-6)  # top level is max|W|
    assert (deq - w).abs().max() <= step / 2 + 1e-6  # nearest level, nothing clipped
    codes, _ = qz.encode(w, bits)
    assert codes.dtype == torch.int8 and codes.abs().max() == q


def test_two_bit_is_ternary_at_max_abs():
    w = _weight()
    m = w.abs().max().item()
    deq = _dequantized(MaxScaleQuantizer(), w, 2)
    assert set(deq.unique().tolist()) == {-m, 0.0, m}


def test_one_bit_is_sign_times_mean_abs():
    w = _weight()
    w[0, 0] = 0.0  # sign(0) = +1: a binary code has no zero
    alpha = w.abs().mean()
    deq = _dequantized(MaxScaleQuantizer(), w, 1)
    assert set(deq.unique().tolist()) == {-alpha.item(), alpha.item()}
    torch.testing.assert_close(deq, torch.where(w >= 0, alpha, -alpha), rtol=0, atol=0)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_forward_is_the_dequantized_weight(bits):
    w = _weight()
    qz = MaxScaleQuantizer()
    qz.set_bits(bits)
    w.requires_grad_(True)
    # bit-exact, 1 bit included: the packed model computes codes x scale, and so must QAT
    assert torch.equal(qz(w), _dequantized(qz, w, bits))


def test_lsq_step_pushed_below_zero_is_floored_and_still_learns():
    qz = LearnedScaleQuantizer((4,))
    qz.set_bits(4)
    w = _weight().requires_grad_(True)
    qz(w)  # initialises the step from the weight
    with torch.no_grad():
        qz.steps["step_4bit"].fill_(-0.5)  # where an optimizer step could push it
    out = qz(w)
    assert torch.isfinite(out).all()
    codes, scale = qz.encode(w, 4)
    assert float(scale) == pytest.approx(LearnedScaleQuantizer.MIN_STEP)
    (out * w.detach()).sum().backward()  # d/ds = sum(w * code) > 0: every code has the sign of w
    assert qz.steps["step_4bit"].grad is not None and float(qz.steps["step_4bit"].grad) != 0.0


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_per_channel_grid_per_output_channel(bits):
    w = _weight((6, 4, 3))  # Conv1d-shaped: one scale per output channel
    w[2] = 0.0  # an all-zero channel must stay zero, not NaN
    qz = MaxScaleQuantizer(per_channel=True)
    codes, scale = qz.encode(w, bits)
    assert scale.shape == (6,)
    deq = qz.decode(codes, scale, w)
    assert torch.equal(deq[2], torch.zeros_like(deq[2]))
    for c in (0, 1, 3, 4, 5):
        row = w[c]
        if bits == 1:
            alpha = row.abs().mean().item()
            assert set(deq[c].unique().tolist()) <= {-alpha, alpha}
            continue
        q = 2 ** (bits - 1) - 1
        step = row.abs().max() / q
        assert set(deq[c].unique().tolist()) <= set((torch.arange(-q, q + 1, dtype=torch.float32) * step).tolist())
        assert math.isclose(deq[c].abs().max().item(), row.abs().max().item(), rel_tol=1e-6)
    if bits >= 2:  # per-tensor differs: small channels get finer steps
        assert not torch.equal(deq, _dequantized(MaxScaleQuantizer(), w, bits))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_learned_scale_levels_and_initialisation(bits):
    w = _weight()
    qz = LearnedScaleQuantizer((bits,))
    qz.set_bits(bits)
    out = qz(w)
    q = 1 if bits == 1 else 2 ** (bits - 1) - 1
    m = w.abs().mean()
    s = qz.steps[f"step_{bits}bit"].detach().clone()
    torch.testing.assert_close(s, m if bits == 1 else 2 * m / math.sqrt(q))  # LSQ initialisation
    levels = torch.tensor([k for k in range(-q, q + 1) if bits >= 2 or k != 0], dtype=torch.float32) * s
    assert set(out.detach().unique().tolist()) <= set(levels.tolist())
    with torch.no_grad():
        qz.steps[f"step_{bits}bit"].mul_(3.0)
    qz(w)
    assert torch.equal(qz.steps[f"step_{bits}bit"].detach(), 3.0 * s)  # initialised once, then learned


# ---------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_max_scale_gradient_is_straight_through(bits):
    w = _weight().requires_grad_()
    qz = MaxScaleQuantizer()
    qz.set_bits(bits)
    g = _weight(seed=1)
    (qz(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize(
    "bits,expected_out,expected_grad_w,expected_grad_s",
    [
        # w / s = [0.6, -2.4, 0.1, 4.0]; q = 1; inside |v| <= 1 -> [T, F, T, F]
        # step grad: g * sum(grad * (code - v inside, code outside)), g = 1 / sqrt(numel * q) = 0.5
        (2, [0.5, -0.5, 0.0, 0.5], [1.0, 0.0, 3.0, 0.0], 0.5 * (1 * 0.4 + 2 * -1 + 3 * -0.1 + 4 * 1)),
        (1, [0.5, -0.5, 0.5, 0.5], [1.0, 0.0, 3.0, 0.0], 0.5 * (1 * 0.4 + 2 * -1 + 3 * 0.9 + 4 * 1)),
    ],
)
def test_lsq_gradients_by_hand(bits, expected_out, expected_grad_w, expected_grad_s):
    qz = LearnedScaleQuantizer((bits,))
    with torch.no_grad():
        qz.steps[f"step_{bits}bit"].fill_(0.5)
        qz.initialized.fill_(True)
    qz.set_bits(bits)
    w = torch.tensor([0.3, -1.2, 0.05, 2.0], requires_grad=True)
    out = qz(w)
    torch.testing.assert_close(out, torch.tensor(expected_out))
    (out * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor(expected_grad_w))  # masked outside the clip range
    step_grad = qz.steps[f"step_{bits}bit"].grad
    assert step_grad != 0
    torch.testing.assert_close(step_grad, torch.tensor(expected_grad_s))


# ---------------------------------------------------------------------------------- bit widths
@pytest.mark.parametrize("bad", [7, 0.5, 16, -1, True, "4"])
def test_unknown_width_lists_allowed_widths(bad):
    with pytest.raises(UnsupportedBitWidth, match=ALLOWED):
        MaxScaleQuantizer().set_bits(bad)
    with pytest.raises(UnsupportedBitWidth, match=ALLOWED):
        check_bits(bad, "somewhere")


def test_width_outside_the_built_choices_is_refused():
    qz = LearnedScaleQuantizer((2, 4))
    with pytest.raises(UnsupportedBitWidth, match=r"built for bit widths \[2, 4\], not 8"):
        qz.set_bits(8)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    quantize_(layer, QuantConfig.from_config({"bits": 4}))
    with pytest.raises(UnsupportedBitWidth, match=r"built for bit widths \[4\], not 2"):
        set_bits(layer, [("*", 2)])
    with pytest.raises(UnsupportedBitWidth, match=ALLOWED):
        set_bits(layer, [("*", 7)])


@pytest.mark.parametrize("method", ["max", "lsq"])
def test_switching_bits_at_run_time_on_the_same_weights(method):
    root = torch.nn.Sequential(torch.nn.Linear(24, 16))
    quantize_(root, QuantConfig.from_config({"bits": 8, "method": method, "bit_choices": list(SUPPORTED_BITS)}))
    layer = root[0]
    weight = layer.weight
    before = weight.detach().clone()
    x = _weight((5, 24), seed=2)
    outputs = {}
    for bits in (8, 4, 2, 1, 0, 4, 8):
        layer.set_bits(bits)
        qz = layer.weight_quantizer
        expected_w = qz.decode(*qz.encode(layer.weight, bits), layer.weight) if bits else layer.weight
        y = layer(x)
        torch.testing.assert_close(y, F.linear(x, expected_w, layer.bias))
        if bits in outputs:
            assert torch.equal(y, outputs[bits])  # coming back to a width gives the same numbers
        outputs[bits] = y
    assert layer.weight is weight and torch.equal(weight.detach(), before)  # weights never touched
    assert torch.equal(outputs[0], F.linear(x, before, layer.bias))  # 0 = full precision
    errors = [(outputs[b] - outputs[0]).abs().mean().item() for b in (8, 4, 2)]
    assert errors == sorted(errors)  # fewer bits, coarser grid
