"""One- and two-bit ASR (issue 15): the std-alpha quantizer, trit packing, stochastic precision and
co-training through the multi-system model.

Hand-computed cases fix the quantizer's levels and its alpha gradient; the model-level tests use a
3-block Conformer small enough to run a training step in milliseconds.
"""
from __future__ import annotations

import argparse
import copy
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch

from espnet_compress.core.plan import PlanError
from espnet_compress.quant.api import QuantConfig, quantize_, quantized_modules
from espnet_compress.quant.bitpack import nbytes, pack, pack_codes, unpack, unpack_codes
from espnet_compress.quant.packed import PackedModelError, load_packed, save_packed
from espnet_compress.quant.quantizers import QUANTIZERS, StdScaleQuantizer, UnsupportedBitWidth

W = [0.3, -1.2, 0.05, 2.0]
GRAD = [1.0, 2.0, 3.0, 4.0]
#: mean 0 and unbiased std exactly 0.1, so s = min(2 std, 1) = 0.2 (below the cap)
W_SMALL = [0.15, -0.05, -0.05, -0.05]


# ------------------------------------------------------------------------------ quantizer
@pytest.mark.parametrize(
    "bits,w,alpha,expected_out,expected_grad_alpha",
    [
        # std(W) = 1.3168 -> s = min(2 std, 1) = 1; step = alpha s = 0.5; u = w/step = [0.6, -2.4, 0.1, 4.0]
        # ternary codes [1, -1, 0, 1]; inside |u| <= 1: [T, F, T, F]
        # d/dalpha = sum g * (code - u inside, code outside) = 1*0.4 + 2*(-1) + 3*(-0.1) + 4*1
        (2, W, 0.5, [0.5, -0.5, 0.0, 0.5], 0.4 - 2.0 - 0.3 + 4.0),
        # binary codes sign(u) = [1, -1, 1, 1]: 1*0.4 + 2*(-1) + 3*(1 - 0.1) + 4*1
        (1, W, 0.5, [0.5, -0.5, 0.5, 0.5], 0.4 - 2.0 + 2.7 + 4.0),
        # s = 2 * 0.1 = 0.2, alpha 1: u = [0.75, -0.25, -0.25, -0.25], all inside
        (2, W_SMALL, 1.0, [0.2, 0.0, 0.0, 0.0], 1 * 0.25 + 2 * 0.25 + 3 * 0.25 + 4 * 0.25),
        (1, W_SMALL, 1.0, [0.2, -0.2, -0.2, -0.2], 1 * 0.25 + 2 * -0.75 + 3 * -0.75 + 4 * -0.75),
        # 4 bits (the conv module): s = max|W| / 7 = 2/7, u = [1.05, -4.2, 0.175, 7] -> [1, -4, 0, 7]
        (4, W, 1.0, [2 / 7, -8 / 7, 0.0, 2.0], 1 * -0.05 + 2 * 0.2 + 3 * -0.175 + 4 * 0.0),
    ],
    ids=["ternary", "binary", "ternary-small-std", "binary-small-std", "4bit"],
)
def test_std_alpha_levels_and_gradients_by_hand(bits, w, alpha, expected_out, expected_grad_alpha):
    qz = StdScaleQuantizer((bits,))
    with torch.no_grad():
        qz.alphas[f"alpha_{bits}bit"].fill_(alpha)
    qz.set_bits(bits)
    weight = torch.tensor(w, requires_grad=True)
    out = qz(weight)
    torch.testing.assert_close(out, torch.tensor(expected_out))
    (out * torch.tensor(GRAD)).sum().backward()
    torch.testing.assert_close(weight.grad, torch.tensor(GRAD))  # identity STE, no clip mask
    torch.testing.assert_close(qz.alphas[f"alpha_{bits}bit"].grad, torch.tensor(float(expected_grad_alpha)))
    codes, step = qz.encode(weight, bits)
    assert codes.dtype == torch.int8 and step.dim() == 0
    assert torch.equal(qz.decode(codes, step, weight), out.detach())  # what a packed file computes


def test_one_alpha_per_precision_and_only_the_active_one_learns():
    qz = StdScaleQuantizer((1, 2, 4))
    assert sorted(n for n, _ in qz.named_parameters()) == ["alphas.alpha_1bit", "alphas.alpha_2bit", "alphas.alpha_4bit"]
    w = torch.tensor(W, requires_grad=True)
    qz.set_bits(1)
    qz(w).sum().backward()
    assert qz.alphas["alpha_1bit"].grad is not None
    assert qz.alphas["alpha_2bit"].grad is None and qz.alphas["alpha_4bit"].grad is None


def test_std_alpha_is_a_quant_conf_method_and_refuses_widths_it_was_not_built_for():
    assert QUANTIZERS["std_alpha"] is StdScaleQuantizer
    conf = QuantConfig.from_config({"bits": {"conv_module": 4, "*": 2}, "method": "std_alpha", "bit_choices": [1]})
    root = torch.nn.ModuleDict({"conv_module": torch.nn.Conv1d(4, 4, 1), "ff": torch.nn.Linear(4, 4)})
    done = quantize_(root, conf)
    assert isinstance(done["ff"].weight_quantizer, StdScaleQuantizer)
    assert (done["conv_module"].bits, done["ff"].bits) == (4, 2)
    with pytest.raises(UnsupportedBitWidth, match=r"built for bit widths \[1, 2, 4\], not 8"):
        done["ff"].set_bits(8)


# ------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("numel", [1, 5, 7, 1003])
def test_trits_pack_five_ternary_codes_per_byte_exactly(numel):
    codes = np.random.default_rng(numel).integers(-1, 2, size=numel)
    data = pack(codes, 2, "trits")
    assert len(data) == nbytes(numel, 2, "trits") == math.ceil(numel / 5)
    assert np.array_equal(unpack(data, 2, numel, "trits"), codes)
    assert len(pack(codes, 2)) == math.ceil(numel / 4)  # the 2-bit layout
    assert len(pack_codes(np.where(codes >= 0, 1, -1), 1)) == math.ceil(numel / 8)  # 1 bit: 8 per byte


def test_codes_that_disagree_with_their_declared_width_or_layout_are_refused():
    with pytest.raises(ValueError, match="trit packing holds ternary"):
        pack(np.zeros(4), 4, "trits")
    with pytest.raises(ValueError, match="unknown code packing"):
        unpack(b"\0", 2, 1, "base4")
    with pytest.raises(ValueError, match="ternary codes must lie in"):
        pack(np.array([2]), 2, "trits")
    # 4-bit codes (7 = 0b0111 offset -> 14) read as 2-bit ones contain the pattern 3, no ternary code
    four_bit = pack_codes(np.array([7, -7, 7, 7]), 4)
    with pytest.raises(ValueError, match="not a 2-bit code"):
        unpack_codes(four_bit, 2, 8)
    with pytest.raises(ValueError, match="is not five trits"):
        unpack(bytes([255]), 2, 5, "trits")
