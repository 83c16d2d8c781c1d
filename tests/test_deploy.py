"""Deployment (issue 16): front end / embedding / output layer quantized through pack and load,
the int8 x int8 dynamic-activation kernel against the dequantized path, kernel fallbacks, the size
report's tensor groups, and older packed format versions."""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, Optional

import pytest
import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder

from espnet_compress.encoders.aliases import QuantizedConformerEncoder
from espnet_compress.export.packed_export import size_summary
from espnet_compress.models.compressed_asr import CompressedASRModel
from espnet_compress.quant.api import QuantConfig, QuantConfigError, quantized_modules
from espnet_compress.quant.inference import (
    DynamicInt8Linear,
    KernelUnavailable,
    cpu_features,
    freeze_for_inference,
)
from espnet_compress.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear, attach_quantizer
from espnet_compress.quant.packed import MAGIC, pack_model, unpack_state_dict
from tests.conftest import tiny_conformer_options

FEAT, VOCAB = 20, 12


def _model(per_channel: bool = True, seed: int = 0, **switches: Any) -> CompressedASRModel:
    torch.manual_seed(seed)
    enc_q: Dict[str, Any] = {"bits": {"embed.*": 8, "*": 4}, "per_channel": per_channel, "conv2d": True}
    dec_q: Dict[str, Any] = {"bits": {"embed.*": 8, "*": 4}, "per_channel": per_channel, "embedding": True,
                             "ctc": True}
    dec_q.update(switches)
    encoder = QuantizedConformerEncoder(FEAT, quant_conf=enc_q, **tiny_conformer_options())
    decoder = TransformerDecoder(VOCAB, 32, attention_heads=2, linear_units=48, num_blocks=1, dropout_rate=0.0,
                                 positional_dropout_rate=0.0, self_attention_dropout_rate=0.0,
                                 src_attention_dropout_rate=0.0)
    token_list = ["<blank>", *[f"t{i}" for i in range(VOCAB - 2)], "<sos/eos>"]
    return CompressedASRModel(vocab_size=VOCAB, token_list=token_list, frontend=None, specaug=None, normalize=None,
                              preencoder=None, encoder=encoder, postencoder=None, decoder=decoder,
                              ctc=CTC(VOCAB, 32), joint_network=None, decoder_quant=dec_q).eval()


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x, lens = torch.randn(2, 40, FEAT, generator=g), torch.tensor([40, 31])
    ys = torch.randint(1, VOCAB - 1, (2, 5), generator=g)
    with torch.no_grad():
        enc, enc_lens = model.encode(x, lens)
        dec, _ = model.decoder(enc, enc_lens, ys, torch.tensor([5, 4]))
    return torch.cat([enc.flatten(), dec.flatten()])


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_front_end_embedding_output_layer_round_trip_equals_fake_quant(per_channel, monkeypatch):
    # the dequantized path, so the comparison can be bit for bit ("auto" may time another kernel
    # faster on a busy machine; each kernel's tolerance is tested on its own)
    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", "dequant")
    qat = _model(per_channel)
    q = quantized_modules(qat)
    assert isinstance(q["encoder.embed.conv.0"], QuantConv2d) and isinstance(q["encoder.embed.conv.2"], QuantConv2d)
    assert isinstance(q["decoder.embed.0"], QuantEmbedding) and isinstance(q["decoder.output_layer"], QuantLinear)
    assert isinstance(q["ctc.ctc_lo"], QuantLinear)
    reference = _outputs(qat)
    header, blob = pack_model(qat)
    state = {MAGIC: json.dumps(header), "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    records = {r["name"]: r for r in header["tensors"]}
    for name in ("encoder.embed.conv.0.weight", "decoder.embed.0.weight", "decoder.output_layer.weight"):
        assert records[name]["bits"] in (4, 8)
    fresh = _model(per_channel, seed=1)
    fresh.load_state_dict(state, strict=False)  # the packed-loading hook, as Speech2Text loads
    assert not quantized_modules(fresh)  # frozen at load
    assert torch.equal(_outputs(fresh), reference)  # the same weights, bit for bit

    groups = size_summary(header, 1, 1)["tensor_groups"]
    assert groups["front end"]["quantized"] == 3 and groups["embedding"]["quantized"] == 1
    assert groups["output layer"]["quantized"] == 1 and groups["norms/biases"]["quantized"] == 0
    assert groups["ctc"]["quantized"] == 1
    assert sum(g["bytes"] for g in groups.values()) == header["blob_bytes"]


def test_switches_keep_layers_fp_and_bad_values_name_the_yaml_path():
    model = _model(embedding=False, output_layer=False)
    names = set(quantized_modules(model))
    assert "decoder.embed.0" not in names and "decoder.output_layer" not in names
    assert "decoder.decoders.0.feed_forward.w_1" in names
    with pytest.raises(QuantConfigError, match=r"model_conf.decoder_quant.embedding: expected true or false"):
        QuantConfig.from_config({"embedding": "yes"}, "model_conf.decoder_quant")
    with pytest.raises(QuantConfigError, match=r"encoder_conf.quant_conf: unknown option\(s\) \['conv3d'\]"):
        QuantConfig.from_config({"conv3d": True}, "encoder_conf.quant_conf")
    with pytest.raises(QuantConfigError, match=r"encoder_conf.quant_conf.ctc: .* set model_conf.decoder_quant.ctc"):
        QuantizedConformerEncoder(FEAT, quant_conf={"ctc": True}, **tiny_conformer_options())


def _linear(bits: int, per_channel: bool, shape=(96, 64), seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(shape[1], shape[0])
    conf = QuantConfig.from_config({"bits": bits, "per_channel": per_channel})
    attach_quantizer(layer, conf.make_quantizer()).set_bits(bits)
    return layer.eval()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("kernel", ["dequant", "int8", "int4", "qdyn"])
def test_each_kernel_against_the_dequantized_path(kernel, per_channel, bits):
    """Tolerances: ``dequant`` computes with the same fp32 weight, so only BLAS summation order
    differs (1e-5 on outputs of size ~1). ``int8``/``int4`` are weight-only with exact integer
    codes: fp32 accumulation, 1e-4. ``qdyn`` rounds each activation to a uint8 grid of step
    ``s_x = (max(x,0) - min(x,0)) / levels`` (levels 255, or 127 with 8-bit codes: reduce_range),
    an error of at most ``s_x / 2`` per input, so each output is off by at most
    ``s_x / 2 * sum_j |W_ij|`` (plus fp32 rounding): that bound, per output element, is the test."""
    layer = _linear(bits, per_channel)
    codes, scale = layer.weight_quantizer.encode(layer.weight, bits)
    w = layer.weight_quantizer.decode(codes, scale, layer.weight)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    reference = torch.nn.functional.linear(x, w, layer.bias)
    frozen = torch.nn.Sequential(layer)
    chosen = freeze_for_inference(frozen, kernel)
    with torch.no_grad():
        out = frozen(x)
    if kernel == "qdyn":
        assert isinstance(frozen[0], DynamicInt8Linear) and chosen["0"] == "qdyn"
        assert torch.equal(frozen[0].codes, codes)  # the stored codes as they are: no re-quantization
        levels = 127 if bits == 8 else 255
        step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / levels
        bound = step / 2 * w.abs().sum(dim=1) + 1e-4
        assert ((out - reference).abs() <= bound).all()
        assert (out - reference).abs().max() > 0  # activations really are quantized
    else:
        torch.testing.assert_close(out, reference, atol=1e-5 if chosen["0"] == "dequant" else 1e-4, rtol=0)


@pytest.mark.parametrize("kernel", ["dequant", "int8", "int4", "qdyn"])
def test_every_kernel_serves_a_narrowed_elastic_layer_exactly(kernel):
    """An elastic FFN run narrower than it is stored computes with a slice of the layer's weight and
    its bias (``sliced_weight``), not with the kernel's forward: every kernel's frozen form must
    expose exactly the stored codes x scales and the bias (``auto`` may pick any of them)."""
    from espnet_compress.core.elastic import sliced_weight

    layer = _linear(4, True)
    codes, scale = layer.weight_quantizer.encode(layer.weight, 4)
    w = layer.weight_quantizer.decode(codes, scale, layer.weight)
    bias = layer.bias.detach().clone()
    frozen = torch.nn.Sequential(layer)
    freeze_for_inference(frozen, kernel)
    assert torch.equal(sliced_weight(frozen[0], cols=32), w[:, :32])
    assert torch.equal(frozen[0].bias, bias)


def test_forced_unavailable_kernel_names_reason_and_fallback(caplog):
    layer = _linear(8, True, shape=(48, 40))  # 8-bit codes and 40 inputs: no int4 kernel
    with caplog.at_level(logging.WARNING, logger="espnet_compress.quant.inference"):
        chosen = freeze_for_inference(torch.nn.Sequential(layer), "int4")
    assert chosen["0"] in ("dequant", "int8")  # auto's pick among what can run (tiny layer: no qdyn)
    assert "kernel 'int4' (ESPNET_COMPRESS_KERNEL) is unavailable for a 48x40 8-bit layer: 8-bit codes" in caplog.text
    assert "falling back to auto" in caplog.text and cpu_features() in caplog.text
    with pytest.raises(KernelUnavailable, match="falling back to"):
        freeze_for_inference(torch.nn.Sequential(_linear(8, True, shape=(48, 40))), "int4", strict=True)


def test_qdyn_missing_from_the_build_falls_back(monkeypatch, caplog):
    import espnet_compress.quant.inference as inference

    monkeypatch.setattr(inference, "_has_qdyn_kernel", lambda: False)
    with caplog.at_level(logging.WARNING, logger="espnet_compress.quant.inference"):
        chosen = freeze_for_inference(torch.nn.Sequential(_linear(4, True)), "qdyn")
    assert chosen["0"] != "qdyn" and "torch has no fbgemm quantized::linear_dynamic" in caplog.text


def test_older_format_version_loads_and_unknown_is_refused_by_name():
    header, blob = pack_model(_linear(4, True))
    import hashlib

    old: Dict[str, Optional[Any]] = dict(header, version=1, sha256=hashlib.sha256(blob).hexdigest())
    state = {MAGIC: json.dumps(old), "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    assert unpack_state_dict(state, "v1.pth").header["version"] == 1
    state[MAGIC] = json.dumps(dict(header, version=0))
    from espnet_compress.quant.packed import PackedModelError

    with pytest.raises(PackedModelError, match=r"v0.pth: packed format version 0 is not supported .*reads versions \[1, 2"):
        unpack_state_dict(state, "v0.pth")
