"""Bit-plane nesting: every width is the top bits of the widest width's codes, so ONE packed file of
a nested supernet decodes every system with exactly the codes that system trained with."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from espnet_compress.core.elastic import sliced_weight
from espnet_compress.export import ExportError, export_packed
from espnet_compress.quant.api import QuantConfig, QuantConfigError, quantized_modules
from espnet_compress.quant.packed import PackedModelError, at_model_widths, check_against_model, load_packed
from espnet_compress.quant.quantizers import (BitPlaneQuantizer, MaxScaleQuantizer, UnsupportedBitWidth, qmax,
                                              slice_codes)
from tests.test_export import ENCODER_CONF, FEAT_DIM, _encode, _write_experiment

ALL_CODES = torch.arange(-127, 128, dtype=torch.int8)
BITPLANE = {"bits": 8, "bit_choices": [2, 4, 8], "method": "bitplane", "per_channel": True}
SYSTEMS = {
    "full8": {"bits": 8, "decoder_bits": 8},
    "shallow8": {"blocks": [0], "bits": 8, "decoder_bits": 8},
    "narrow4": {"ffn_units": 24, "bits": 4, "decoder_bits": 4},
    "int2": {"bits": 2, "decoder_bits": 2},
}


@pytest.mark.parametrize("to_bits", [2, 3, 4, 5, 6, 8])
def test_slice_is_the_rounded_top_bits_odd_and_monotonic(to_bits):
    k = 8 - to_bits
    got = slice_codes(ALL_CODES, 8, to_bits).to(torch.int64)
    c = ALL_CODES.to(torch.int64)
    # round half away from zero of c / 2**k, by exact integer arithmetic, clamped to the narrow grid
    expected = torch.sign(c) * torch.clamp((2 * c.abs() + (1 << k)) // (1 << (k + 1)), max=qmax(to_bits)) if k else c
    assert torch.equal(got, expected)
    assert torch.equal(slice_codes(-ALL_CODES, 8, to_bits), -slice_codes(ALL_CODES, 8, to_bits))
    assert bool((got[1:] >= got[:-1]).all())
    assert got.abs().max() == qmax(to_bits)


def test_slice_refuses_widening_and_one_bit():
    with pytest.raises(UnsupportedBitWidth, match="cannot slice 4-bit codes to 8 bits"):
        slice_codes(ALL_CODES, 4, 8)
    with pytest.raises(UnsupportedBitWidth, match="to 1 bits"):
        slice_codes(ALL_CODES, 8, 1)


@pytest.mark.parametrize("per_channel", [False, True])
def test_every_width_is_a_slice_of_the_stored_codes(per_channel):
    w = torch.randn(16, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = BitPlaneQuantizer((2, 4, 8), per_channel=per_channel)
    c8, s8 = q.encode(w, 8)
    assert torch.equal(c8, MaxScaleQuantizer((8,), per_channel=per_channel).encode(w, 8)[0])
    for bits in (2, 4):
        codes, scale = q.encode(w, bits)
        assert torch.equal(codes, slice_codes(c8, 8, bits))
        assert torch.equal(scale, s8 * 2 ** (8 - bits))
        q.set_bits(bits)
        out = q(w)
        assert torch.equal(out, q.decode(codes, scale, w))  # the forward computes with those codes
        out.sum().backward()
        assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
        w.grad = None


def test_one_bit_and_per_channel_options_are_validated():
    with pytest.raises(QuantConfigError, match="method 'bitplane' nests widths >= 2 only"):
        QuantConfig.from_config({"bits": 8, "bit_choices": [1, 8], "method": "bitplane"}, "encoder_conf.quant_conf")
    with pytest.raises(UnsupportedBitWidth, match="nests widths >= 2"):
        BitPlaneQuantizer((1, 8))
    with pytest.raises(QuantConfigError, match="per_channel is only supported with the max-scaled methods"):
        QuantConfig.from_config({"bits": 4, "method": "lsq", "per_channel": True})
    made = QuantConfig.from_config(BITPLANE).make_quantizer()
    assert isinstance(made, BitPlaneQuantizer) and made.per_channel and made.master_bits == 8


def test_narrowed_layer_reads_a_slice_of_the_whole_weights_codes():
    layer = torch.nn.Linear(10, 16)
    from espnet_compress.quant.modules import attach_quantizer

    attach_quantizer(layer, BitPlaneQuantizer((4, 8)))
    layer.set_bits(4)
    whole = layer.weight_quantizer(layer.weight)
    assert torch.equal(sliced_weight(layer, rows=6), whole[:6])
    assert torch.equal(sliced_weight(layer, cols=3), whole[:, :3])
    # a max-scale quantizer quantizes the slice on its own (its own scale): different numbers
    plain = torch.nn.Linear(10, 16)
    plain.load_state_dict(layer.state_dict(), strict=False)
    attach_quantizer(plain, MaxScaleQuantizer((4,)))
    plain.set_bits(4)
    assert not torch.equal(sliced_weight(plain, rows=6), whole[:6])


def _supernet(asr_task, root: Path, systems=None, enc_quant=None) -> argparse.Namespace:
    conf = dict(ENCODER_CONF, num_blocks=2, linear_units=48, quant_conf=dict(enc_quant or BITPLANE, conv2d=True))
    model_conf = {"ctc_weight": 0.3, "decoder_quant": dict(BITPLANE, embedding=True, ctc=True),
                  "systems": systems or SYSTEMS}
    exp = _write_experiment(asr_task, root, "elastic_conformer", conf, "compressed", model_conf)
    with torch.no_grad():  # move the weights off their init so the grids are exercised
        for p in exp.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    torch.save(exp.model.state_dict(), exp.checkpoint)
    return exp


@pytest.fixture(scope="module")
def supernet(asr_task, tmp_path_factory):
    exp = _supernet(asr_task, tmp_path_factory.mktemp("bitplane") / "asr")
    return exp, export_packed(exp.config, exp.checkpoint, exp.root / "packed")


def test_one_file_stores_every_quantized_weight_once_at_the_widest_width(supernet):
    exp, result = supernet
    header = load_packed(result.packed_file).header
    quantized = [r for r in header["tensors"] if r["bits"]]
    assert {r["bits"] for r in quantized} == {8} and all(r["nested"] for r in quantized)
    names = {r["name"] for r in quantized}
    assert {"encoder.embed.conv.0.weight", "decoder.embed.0.weight", "ctc.ctc_lo.weight"} <= names
    assert result.report["bit_plane_systems"] == list(SYSTEMS)
    assert "this one file decodes systems full8, shallow8, narrow4, int2" in result.size_report_md.read_text()


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_each_system_decodes_from_the_one_file_with_the_codes_it_trained_with(asr_task, supernet, system,
                                                                              monkeypatch):
    exp, result = supernet
    monkeypatch.setenv("ESPNET_COMPRESS_SYSTEM", system)
    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", "dequant")
    trained, _ = asr_task.ASRTask.build_model_from_file(exp.config, exp.checkpoint, "cpu")
    trained.eval()
    packed = load_packed(result.packed_file)
    check_against_model(packed, trained, "test", fillable=(".norm_stats.", "num_steps"))
    sliced = at_model_widths(packed, trained)
    for name, module in quantized_modules(trained).items():
        codes, scale, bits = sliced.encodings[f"{name}.weight"]
        assert bits == module.bits
        expected_codes, expected_scale = module.weight_quantizer.encode(module.weight, module.bits)
        assert torch.equal(codes, expected_codes), name
        assert torch.equal(scale, expected_scale), name
    deployed, _ = asr_task.ASRTask.build_model_from_file(result.config_file, result.packed_file, "cpu")
    deployed.eval()
    assert deployed.active_system == system
    speech = torch.randn(1, 64, FEAT_DIM, generator=torch.Generator().manual_seed(1))
    # same codes, same fp ops up to the dequantize-once vs dequantize-per-forward order: 1e-5 relative
    torch.testing.assert_close(_encode(deployed, speech), _encode(trained, speech), rtol=1e-5, atol=1e-5)


def test_a_system_in_full_precision_cannot_be_packed_as_planes(asr_task, tmp_path):
    exp = _supernet(asr_task, tmp_path / "asr", systems={"fp": {"bits": 0}, "int4": {"bits": 4, "decoder_bits": 4}},
                    enc_quant=dict(BITPLANE, bits=0))
    with pytest.raises(ExportError, match=r"model_conf.systems.fp runs 'encoder.embed.conv.0' in full precision"):
        export_packed(exp.config, exp.checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_planes_are_refused_by_a_model_of_another_quantizer(asr_task, supernet, tmp_path):
    _, result = supernet
    other = _supernet(asr_task, tmp_path / "max", enc_quant=dict(BITPLANE, method="max"))
    with pytest.raises(PackedModelError, match="is stored as 8-bit planes, but the config builds 'MaxScaleQuantizer'"):
        check_against_model(load_packed(result.packed_file), other.model, "f.pth")


@pytest.mark.parametrize("system", ["narrow4", "int2"])
def test_a_standalone_system_export_keeps_the_sliced_codes(asr_task, supernet, system, tmp_path, monkeypatch):
    from espnet_compress.export.system_export import export_system

    exp, _ = supernet
    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", "dequant")
    out = export_system(exp.config, exp.checkpoint, system, tmp_path / system)
    assert out.packed and not out.stock
    standalone, _ = asr_task.ASRTask.build_model_from_file(out.config, out.model_file, "cpu")
    monkeypatch.setenv("ESPNET_COMPRESS_SYSTEM", system)
    trained, _ = asr_task.ASRTask.build_model_from_file(exp.config, exp.checkpoint, "cpu")
    speech = torch.randn(1, 64, FEAT_DIM, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_encode(standalone.eval(), speech), _encode(trained.eval(), speech),
                               rtol=1e-5, atol=1e-5)


def test_a_malformed_nested_mark_is_refused_by_tensor(tmp_path):
    """Format-1 headers are not covered by the checksum, so the record checks must catch this."""
    from tests.test_packed_integrity import LEGACY, _rewrite_header

    src = LEGACY / "qat4_packed" / "model.packed.pth"
    word = tmp_path / "word.pth"
    _rewrite_header(src, word, lambda h: next(r for r in h["tensors"] if r["bits"]).update(nested="yes"))
    with pytest.raises(PackedModelError, match=r"word.pth: tensor '.*': 'nested' must be true or false, got 'yes'"):
        load_packed(word)
    raw = tmp_path / "raw.pth"
    _rewrite_header(src, raw, lambda h: next(r for r in h["tensors"] if not r["bits"]).update(nested=True))
    with pytest.raises(PackedModelError, match=r"raw.pth: tensor '.*': marked nested \(bit planes\) but stored in full"):
        load_packed(raw)
