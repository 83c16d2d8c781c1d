"""Bit packing and packed checkpoints: dense sizes, exact round trips, loud failures, and the
inference freeze that a packed load ends with."""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from espnet_compress.encoders.aliases import QuantizedConformerEncoder
from espnet_compress.quant.api import QuantConfig, QuantConfigError, quantize_, quantized_modules
from espnet_compress.quant.bitpack import pack_codes, packed_nbytes, unpack_codes
from espnet_compress.quant.inference import (
    KERNELS,
    Int4WeightLinear,
    Int8WeightLinear,
    _has_int4_kernel,
    _has_int8_kernel,
    freeze_for_inference,
)
from espnet_compress.quant.modules import QuantLinear
from espnet_compress.quant.packed import MAGIC, PackedModelError, load_packed, save_packed, unpack_state_dict
from espnet_compress.quant.quantizers import QUANTIZERS, SUPPORTED_BITS, UnsupportedBitWidth, qmax
from tests.conftest import tiny_conformer_options

FEAT_DIM = 20

#: Every supported width somewhere, first match wins (conv modules of block 2 are 6-bit, not 2-bit),
#: ``0`` keeps a quantized layer in full precision.
MIXED_BITS: Dict[str, int] = {
    "embed.*": 8,
    "*.conv_module.*": 6,
    "encoders.0.feed_forward.*": 3,
    "encoders.1.feed_forward.*": 5,
    "*.self_attn.linear_out": 1,
    "*.self_attn.linear_pos": 0,
    "encoders.2.*": 2,
    "*": 4,
}


def flip_blob_byte(src: Path, dst: Path) -> None:
    """Copy a packed file with one payload byte inverted; the torch container itself stays valid
    (torch does not verify member CRCs), so only the packed format's own checksum can notice."""
    blob = torch.load(src, weights_only=True)["blob"].numpy().tobytes()
    raw = bytearray(src.read_bytes())
    start = raw.find(blob)
    assert start >= 0 and raw.find(blob, start + 1) < 0, "payload not found exactly once"
    raw[start + len(blob) // 2] ^= 0xFF
    dst.write_bytes(bytes(raw))


def _encoder(quant_conf: Dict[str, Any], seed: int = 0, **overrides: Any) -> QuantizedConformerEncoder:
    torch.manual_seed(seed)
    return QuantizedConformerEncoder(FEAT_DIM, quant_conf=quant_conf, **tiny_conformer_options(**overrides)).eval()


def _inputs() -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 40, FEAT_DIM, generator=g), torch.tensor([40, 31])


def _run(encoder: torch.nn.Module) -> torch.Tensor:
    x, lens = _inputs()
    with torch.no_grad():
        return encoder(x, lens)[0]


def _train_step(encoder: torch.nn.Module) -> None:
    """One SGD step so weights and learned steps are not at their initial values."""
    encoder.train()
    x, lens = _inputs()
    encoder(x, lens)[0].pow(2).mean().backward()
    with torch.no_grad():
        for p in encoder.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
                p.grad = None
    encoder.eval()


# ---------------------------------------------------------------------------------- bit packing
@st.composite
def codes_and_bits(draw: st.DrawFn) -> Tuple[np.ndarray, int]:
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    values = st.sampled_from([-1, 1]) if bits == 1 else st.integers(-qmax(bits), qmax(bits))
    return np.array(draw(st.lists(values, max_size=300)), dtype=np.int8), bits


@settings(max_examples=400, deadline=None)
@given(codes_and_bits())
def test_pack_unpack_round_trip_at_true_width(case):
    codes, bits = case
    data = pack_codes(codes, bits)
    assert len(data) == math.ceil(codes.size * bits / 8) == packed_nbytes(codes.size, bits)
    np.testing.assert_array_equal(unpack_codes(data, bits, codes.size), codes)


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_odd_widths_are_dense(bits):
    codes = np.resize(np.arange(-qmax(bits), qmax(bits) + 1, dtype=np.int8), 1000)
    assert len(pack_codes(codes, bits)) == 1000 * bits // 8  # not rounded up to 4 or 8 bits per code


def test_pack_rejects_codes_off_the_grid():
    with pytest.raises(ValueError, match=r"3-bit codes must lie in \[-3, 3\]"):
        pack_codes(np.array([4]), 3)
    with pytest.raises(ValueError, match="1-bit codes must be -1 or"):
        pack_codes(np.array([0]), 1)
    with pytest.raises(ValueError, match="expected 2 bytes for 4 4-bit codes, got 1"):
        unpack_codes(b"\x00", 4, 4)
    with pytest.raises(UnsupportedBitWidth):
        pack_codes(np.array([1]), 7)


# ---------------------------------------------------------------------------------- bit specs
def test_bit_spec_first_match_wins_zero_is_fp_exclude_skips():
    enc = _encoder({"bits": MIXED_BITS, "exclude": ["encoders.1.self_attn.linear_q"]})
    bits = {name: m.bits for name, m in quantized_modules(enc).items()}
    assert bits["embed.out.0"] == 8
    assert bits["encoders.2.conv_module.pointwise_conv1"] == 6  # before "encoders.2.*"
    assert bits["encoders.2.feed_forward.w_1"] == 2
    assert bits["encoders.0.feed_forward.w_2"] == 3
    assert bits["encoders.0.feed_forward_macaron.w_2"] == 4  # "feed_forward.*" does not match it
    assert bits["encoders.1.feed_forward.w_1"] == 5
    assert bits["encoders.2.self_attn.linear_out"] == 1
    assert bits["encoders.0.self_attn.linear_pos"] == 0  # quantizer attached, full precision
    assert "encoders.1.self_attn.linear_q" not in bits  # excluded: stays a plain Linear
    assert type(enc.encoders[1].self_attn.linear_q) is torch.nn.Linear
    assert set(bits.values()) == {0, *SUPPORTED_BITS}

    cfg = QuantConfig.from_config({"bits": {"a.*": 2, "a.b": 8}})
    assert cfg.bits_for("a.b") == 2 and cfg.bits_for("c") == 0  # no rule matches: fp


@pytest.mark.parametrize(
    "conf,error,message",
    [
        ({"bitz": 4}, QuantConfigError, r"quant_conf: unknown option\(s\) \['bitz'\]; allowed: \["),
        ({"method": "kmeans"}, QuantConfigError, re.escape(f"quant_conf: unknown method 'kmeans'; allowed: {sorted(QUANTIZERS)}")),
        ({"bits": 7}, UnsupportedBitWidth, r"unsupported bit width 7 for quant_conf.bits\['\*'\]; allowed"),
        ({"bits": {"*.w_1": 4, "*": 9}}, UnsupportedBitWidth, r"for quant_conf.bits\['\*'\]"),
        ({"bits": {"*": "4"}}, QuantConfigError, r"quant_conf: bits for '\*' must be an integer"),
        ({"bit_choices": [2, 7]}, UnsupportedBitWidth, r"for quant_conf.bit_choices; allowed"),
        ({"method": "lsq", "per_channel": True}, QuantConfigError, "quant_conf: per_channel is only supported"),
        (4, QuantConfigError, r"quant_conf: expected a mapping of options, got int"),
    ],
)
def test_quant_config_errors_name_the_option(conf, error, message):
    with pytest.raises(error, match=message):
        QuantConfig.from_config(conf)


def test_encoder_quant_conf_errors_name_the_encoder_option():
    with pytest.raises(QuantConfigError, match=r"encoder_conf.quant_conf: unknown option\(s\) \['bitz'\]"):
        _encoder({"bitz": 4})
    with pytest.raises(QuantConfigError, match="no Linear/Conv1d module left to quantize"):
        quantize_(torch.nn.Sequential(torch.nn.Linear(2, 2)), QuantConfig.from_config({"exclude": ["*"]}))


# ---------------------------------------------------------------------------------- packed files
@pytest.mark.parametrize("quant_conf", [
    {"bits": MIXED_BITS},
    {"bits": MIXED_BITS, "per_channel": True},
    {"bits": MIXED_BITS, "method": "lsq"},
], ids=["max", "max-per-channel", "lsq"])
def test_packed_model_computes_what_the_qat_model_computed(tmp_path, quant_conf):
    qat = _encoder(quant_conf)
    _train_step(qat)
    reference = _run(qat)
    header = save_packed(qat, tmp_path / "enc.pth")
    packed = load_packed(tmp_path / "enc.pth")
    state = packed.tensors
    assert packed.header == header

    records = {r["name"]: r for r in header["tensors"]}
    modules = quantized_modules(qat)
    for name, module in modules.items():
        rec = records[f"{name}.weight"]
        assert rec["bits"] == module.bits
        if module.bits:
            scale_bytes = 4 * math.prod(rec["scale_shape"])
            assert rec["nbytes"] == math.ceil(module.weight.numel() * module.bits / 8) + scale_bytes
            torch.testing.assert_close(state[f"{name}.weight"], module.effective_weight().detach())
        else:
            assert torch.equal(state[f"{name}.weight"], module.weight.detach())
    assert {r["bits"] for r in header["tensors"]} == {0, *SUPPORTED_BITS}
    assert header["blob_bytes"] == sum(r["nbytes"] for r in header["tensors"])

    fresh = _encoder(quant_conf, seed=1)
    fresh.load_state_dict(state)  # strict: every entry present, no extras
    torch.testing.assert_close(_run(fresh), reference, atol=1e-5, rtol=0)


def test_the_load_hook_path_holds_codes_not_a_dequantized_copy(tmp_path):
    """``dequantize=False`` (what the load hook uses): quantized weights are zero-stride
    placeholders of the right shape, the codes are the file's, and freezing from those codes gives
    the same model as loading the dequantized weights."""
    qat = _encoder({"bits": MIXED_BITS})
    save_packed(qat, tmp_path / "enc.pth")
    state = torch.load(tmp_path / "enc.pth", weights_only=True)
    lazy = unpack_state_dict(state, "enc.pth", dequantize=False)
    eager = load_packed(tmp_path / "enc.pth")
    assert lazy.encodings.keys() == eager.encodings.keys() and lazy.encodings
    for name in lazy.encodings:
        placeholder = lazy.tensors[name]
        assert placeholder.shape == eager.tensors[name].shape and not any(placeholder.stride()), name
        assert torch.equal(lazy.encodings[name][0], eager.encodings[name][0])
    for name in set(lazy.tensors) - set(lazy.encodings):
        assert torch.equal(lazy.tensors[name], eager.tensors[name])
    encodings = {k: (codes, scale) for k, (codes, scale, _) in lazy.encodings.items()}
    from_codes = _encoder({"bits": MIXED_BITS}, seed=1)
    from_codes.load_state_dict(lazy.tensors)
    freeze_for_inference(from_codes, "dequant", encodings)
    from_floats = _encoder({"bits": MIXED_BITS}, seed=2)
    from_floats.load_state_dict(eager.tensors)
    freeze_for_inference(from_floats, "dequant", encodings)
    assert torch.equal(_run(from_codes), _run(from_floats))


def test_lsq_steps_are_stored_as_scales(tmp_path):
    """fp16 for plain tensors must not round the LSQ steps: the deployed layer re-encodes its
    weight with the step, so a rounded step would move every weight off the exported grid."""
    qat = _encoder({"bits": 4, "method": "lsq"})
    _train_step(qat)
    header = save_packed(qat, tmp_path / "enc.pth", fp_dtype="float16", scale_dtype="float32")
    steps = [r for r in header["tensors"] if ".weight_quantizer.steps." in r["name"]]
    assert steps and all(r["dtype"] == "float32" for r in steps)
    state = load_packed(tmp_path / "enc.pth").tensors
    fresh = _encoder({"bits": 4, "method": "lsq"}, seed=1)
    fresh.load_state_dict(state)
    freeze_for_inference(fresh, "dequant")
    for name in quantized_modules(qat):
        assert torch.equal(fresh.get_submodule(name).weight, state[f"{name}.weight"]), name


def test_corrupted_payload_is_refused_naming_the_file(tmp_path):
    path, bad = tmp_path / "enc.pth", tmp_path / "flipped.pth"
    save_packed(_encoder({"bits": 4}), path)
    flip_blob_byte(path, bad)
    with pytest.raises(PackedModelError, match="checksum mismatch") as err:
        load_packed(bad)
    assert str(bad) in str(err.value)


def test_truncated_missing_and_foreign_files_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "enc.pth"
    save_packed(_encoder({"bits": 4}), path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PackedModelError, match=rf"{truncated}: cannot read packed checkpoint, the file is truncated"):
        load_packed(truncated)
    with pytest.raises(PackedModelError, match=rf"{tmp_path / 'missing.pth'}: no such packed checkpoint"):
        load_packed(tmp_path / "missing.pth")
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(PackedModelError, match=rf"{plain}: not an espnet_compress packed checkpoint"):
        load_packed(plain)
    state = torch.load(path, weights_only=True)
    header = json.loads(state[MAGIC])
    state[MAGIC] = json.dumps(dict(header, version=99))
    with pytest.raises(PackedModelError, match="x.pth: packed format version 99 is not supported"):
        unpack_state_dict(state, "x.pth")


# ---------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("kernel", ["dequant", "int8", "int4", "auto"])
def test_freeze_for_inference_keeps_outputs(kernel):
    bits = {"*.feed_forward.*": 8, "*.self_attn.linear_q": 2, "embed.*": 1, "*": 4}
    qat = _encoder({"bits": bits}, output_size=64, linear_units=64, num_blocks=2)
    reference = _run(qat)
    frozen = copy.deepcopy(qat)
    chosen = freeze_for_inference(frozen, kernel)
    assert set(chosen) == set(quantized_modules(qat)) and not quantized_modules(frozen)
    torch.testing.assert_close(_run(frozen), reference, atol=1e-4, rtol=0)
    linear = {n for n, m in quantized_modules(qat).items() if isinstance(m, QuantLinear)}
    if kernel == "int8" and _has_int8_kernel():
        assert all(chosen[n] == "int8" for n in linear)
        assert isinstance(frozen.encoders[0].feed_forward.w_1, Int8WeightLinear)
    if kernel == "int4" and _has_int4_kernel():
        assert {n for n in linear if chosen[n] == "int4"} == {n for n in linear if qat.get_submodule(n).bits <= 4}
        assert isinstance(frozen.encoders[0].self_attn.linear_q, Int4WeightLinear)
    # the convolutions: dequantized, or (auto, and a forced Linear kernel leaves them to auto) the
    # depthwise one on shift-adds; these tiny layers are below auto's size for the int8 GEMM
    depthwise = {n for n in chosen if n.endswith("depthwise_conv")}
    assert all(chosen[n] == "dequant" for n in chosen if n not in linear | depthwise)
    assert all(chosen[n] == "dequant" if kernel == "dequant" else chosen[n] in ("dequant", "shiftadd")
               for n in depthwise)


def test_freeze_rejects_unknown_kernel():
    with pytest.raises(ValueError, match=re.escape(f"unknown kernel 'fast' (ESPNET_COMPRESS_KERNEL); allowed: {list(KERNELS)}")):
        freeze_for_inference(_encoder({"bits": 4}), "fast")
