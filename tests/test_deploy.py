"""Deployment (issue 16): front end / embedding / output layer quantized through pack and load,
the int8 x int8 dynamic-activation kernel against the dequantized path, kernel fallbacks, the size
report's tensor groups, and older packed format versions."""
from __future__ import annotations

import copy
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
from tests.conftest import benchmark, tiny_conformer_options

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


def _conv(layer: torch.nn.Module, bits: int, per_channel: bool = True) -> torch.nn.Module:
    conf = QuantConfig.from_config({"bits": bits, "per_channel": per_channel})
    attach_quantizer(layer, conf.make_quantizer()).set_bits(bits)
    return layer.eval()


CONV_CASES = {
    "front-end 3x3 stride 2": (lambda: torch.nn.Conv2d(16, 24, 3, stride=2), (2, 16, 21, 13)),
    "3x3 padded": (lambda: torch.nn.Conv2d(16, 24, 3, padding=1), (1, 16, 9, 7)),
    "asymmetric 3x2 stride (2, 1)": (lambda: torch.nn.Conv2d(8, 12, (3, 2), stride=(2, 1), padding=(1, 0)), (1, 8, 11, 6)),
    "pointwise 1x1 conv1d": (lambda: torch.nn.Conv1d(16, 32, 1), (2, 16, 30)),
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_qdyn_convolutions_against_the_dequantized_path(case, per_channel, bits, monkeypatch):
    """The convolutions on the int8 GEMM: the same bound as a Linear layer (each output off by at
    most ``s_x / 2 * sum |W|`` over its receptive field), with ``s_x`` the whole input's step; the
    Conv2d quantizes each block of output rows with its own scale, never coarser than the whole
    input's. Blocks of one output row here, so every block boundary is exercised."""
    import espnet_compress.quant.inference as inference

    monkeypatch.setattr(inference, "CONV2D_BLOCK_ROWS", 1)
    make, shape = CONV_CASES[case]
    torch.manual_seed(0)
    layer = _conv(make(), bits, per_channel)
    codes, scale = layer.weight_quantizer.encode(layer.weight, bits)
    w = layer.weight_quantizer.decode(codes, scale, layer.weight)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    reference = layer._conv_forward(x, w, layer.bias)
    frozen = torch.nn.Sequential(layer)
    assert freeze_for_inference(frozen, "qdyn") == {"0": "qdyn"}
    with torch.no_grad():
        out = frozen(x)
    assert out.shape == reference.shape and torch.equal(frozen[0].codes, codes)
    torch.testing.assert_close(frozen[0].effective_weight(), w, atol=0, rtol=0)
    levels = 127 if bits == 8 else 255
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / levels
    per_output = w.abs().flatten(1).sum(dim=1)
    bound = (step / 2 * per_output + 1e-4).view(1, -1, *([1] * (x.dim() - 2)))
    assert ((out - reference).abs() <= bound).all()
    assert (out - reference).abs().max() > 0  # activations really are quantized


def test_qdyn_conv2d_output_is_channels_last_and_feeds_the_next_conv2d():
    """ESPnet's ``conv2d`` input layer: conv, ReLU, conv, ReLU. The first GEMM convolution's output
    is NCHW in shape and channels-last in memory, so the second reads it without reordering."""
    torch.manual_seed(0)
    stack = torch.nn.Sequential(_conv(torch.nn.Conv2d(4, 16, 3, stride=2), 8), torch.nn.ReLU(),
                                _conv(torch.nn.Conv2d(16, 16, 3, stride=2), 8), torch.nn.ReLU())
    x = torch.randn(1, 4, 33, 21, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = stack(x)
    freeze_for_inference(stack, "qdyn")
    with torch.no_grad():
        first = stack[1](stack[0](x))
        out = stack(x)
    assert first.is_contiguous(memory_format=torch.channels_last) and first.shape == (1, 16, 16, 10)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, atol=0.05 * float(reference.abs().max()), rtol=0)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if "conv1d" not in c] + ["one input channel"])
def test_im2col_conv2d_equals_torch(case, monkeypatch):
    """``im2col`` is fp32 arithmetic on the dequantized weight (a BLAS GEMM over patches): equal to
    torch's convolution up to summation order, across block boundaries (one output row per block)."""
    import espnet_compress.quant.inference as inference

    monkeypatch.setattr(inference, "CONV2D_BLOCK_ROWS", 1)
    make, shape = CONV_CASES[case] if case in CONV_CASES else (lambda: torch.nn.Conv2d(1, 16, 3, stride=2), (2, 1, 17, 12))
    torch.manual_seed(0)
    layer = _conv(make(), 4)
    codes, scale = layer.weight_quantizer.encode(layer.weight, 4)
    reference = layer._conv_forward(x := torch.randn(*shape, generator=torch.Generator().manual_seed(1)),
                                    layer.weight_quantizer.decode(codes, scale, layer.weight), layer.bias)
    frozen = torch.nn.Sequential(layer)
    assert freeze_for_inference(frozen, "im2col") == {"0": "im2col"}
    with torch.no_grad():
        out = frozen(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel_size", [1, 7, 31])
def test_shiftadd_depthwise_conv_equals_torch(kernel_size, bias):
    """``shiftadd`` is fp32 arithmetic on the dequantized weight: equal to torch's depthwise
    convolution up to summation order, for the convolution module's 'same' padding."""
    torch.manual_seed(0)
    channels = 12
    layer = _conv(torch.nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2,
                                  groups=channels, bias=bias), 4)
    codes, scale = layer.weight_quantizer.encode(layer.weight, 4)
    w = layer.weight_quantizer.decode(codes, scale, layer.weight)
    # (batch, time, channels) transposed: not contiguous, as after a pointwise convolution on the GEMM
    x = torch.randn(3, 40, channels, generator=torch.Generator().manual_seed(1)).transpose(1, 2)
    reference = layer._conv_forward(x, w, layer.bias)
    frozen = torch.nn.Sequential(layer)
    assert freeze_for_inference(frozen, "shiftadd") == {"0": "shiftadd"}
    with torch.no_grad():
        out = frozen(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_a_kernel_that_does_not_serve_a_layer_kind_leaves_it_to_auto_silently(caplog):
    """Forcing ``shiftadd`` (depthwise convolutions only) does not warn for every Linear layer, and
    forcing ``qdyn`` leaves a grouped convolution to ``auto``; a strict run does not raise for them."""
    layers = torch.nn.Sequential(_linear(4, True), _conv(torch.nn.Conv1d(8, 8, 3, padding=1, groups=2), 4))
    with caplog.at_level(logging.WARNING, logger="espnet_compress.quant.inference"):
        assert freeze_for_inference(copy.deepcopy(layers), "shiftadd", strict=True)["1"] == "dequant"
        assert freeze_for_inference(copy.deepcopy(layers), "qdyn", strict=True)["1"] == "dequant"
    assert "unavailable" not in caplog.text


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


@pytest.mark.parametrize("timings, expected", [
    ({"dequant": 1.0, "qdyn": 1.03}, "qdyn"),  # a tie goes to the integer path
    ({"dequant": 1.0, "qdyn": 1.10}, "dequant"),  # fp32 clearly faster
    ({"dequant": 1.0, "int8": 20.0, "int4": 5.0}, "dequant"),
    ({"dequant": 1.0, "im2col": 0.97, "qdyn": 1.2}, "dequant"),  # fp32 paths: a tie keeps torch's op
    ({"dequant": 1.0, "im2col": 0.90, "qdyn": 1.2}, "im2col"),
    ({"dequant": 1.0, "im2col": 0.90, "qdyn": 0.93}, "qdyn"),
    ({"dequant": 1.0, "shiftadd": 0.5}, "shiftadd"),
])
def test_auto_pick_from_timings(timings, expected):
    from espnet_compress.quant.inference import _fastest

    assert _fastest(timings) == expected


def test_forced_unavailable_kernel_names_reason_and_fallback(caplog):
    layer = _linear(8, True, shape=(48, 40))  # 8-bit codes and 40 inputs: no int4 kernel
    with caplog.at_level(logging.WARNING, logger="espnet_compress.quant.inference"):
        chosen = freeze_for_inference(torch.nn.Sequential(layer), "int4")
    assert chosen["0"] in ("dequant", "int8")  # auto's pick among what can run (tiny layer: no qdyn)
    assert "kernel 'int4' (ESPNET_COMPRESS_KERNEL) is unavailable for a 48x40 8-bit layer: 8-bit codes" in caplog.text
    assert "falling back to auto" in caplog.text and cpu_features() in caplog.text
    with pytest.raises(KernelUnavailable, match="falling back to"):
        freeze_for_inference(torch.nn.Sequential(_linear(8, True, shape=(48, 40))), "int4", strict=True)


def test_cpu_features_name_a_librarys_instruction_set_cap(monkeypatch):
    """A cap such as fbgemm's changes which kernel is fastest, so the line ``auto`` logs shows it."""
    cpu_features.cache_clear()
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    try:
        assert "capped by FBGEMM_ENABLE_INSTRUCTIONS=AVX2" in cpu_features()
    finally:
        cpu_features.cache_clear()


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


# ------------------------------------------------------------------ source-attention cache
def _decoder(seed: int = 0) -> TransformerDecoder:
    torch.manual_seed(seed)
    return TransformerDecoder(VOCAB, 32, attention_heads=4, linear_units=48, num_blocks=2, dropout_rate=0.0,
                              positional_dropout_rate=0.0, self_attention_dropout_rate=0.0,
                              src_attention_dropout_rate=0.0).eval()


def _greedy_steps(decoder: TransformerDecoder, memory: torch.Tensor, beams: int, steps: int = 4) -> torch.Tensor:
    """Incremental decoding as ESPnet's batch beam search calls it: the utterance's encoder output
    expanded over the beams (a zero-stride view), one token per step with the layer cache."""
    ys = torch.full((beams, 1), VOCAB - 1, dtype=torch.long)
    cache, outs = None, []
    for _ in range(steps):
        mask = torch.ones(1, ys.size(1), ys.size(1), dtype=torch.bool).tril()
        logp, cache = decoder.forward_one_step(ys, mask, memory.expand(beams, -1, -1), cache=cache)
        outs.append(logp)
        ys = torch.cat([ys, logp.argmax(-1, keepdim=True)], dim=1)
    return torch.stack(outs)


@pytest.mark.parametrize("beams", [1, 3])
def test_source_attention_cache_is_bit_identical_and_follows_the_utterance(beams):
    """The cached keys/values are the same layers on the same input, computed once: outputs equal
    bit for bit with one hypothesis; with beams the projection runs on one row instead of one per
    beam (BLAS blocking differs: float rounding, 1e-6 on log-probabilities of size ~3). A second
    utterance (same shape) must not reuse the first one's projections, nor an in-place change of
    the encoder output."""
    from espnet_compress.models.memory_cache import CachedSourceAttention, cache_source_attention

    plain, cached = _decoder(), _decoder()
    assert cache_source_attention(cached) == 2
    assert all(type(layer.src_attn) is CachedSourceAttention for layer in cached.decoders)
    g = torch.Generator().manual_seed(4)
    first, second = torch.randn(1, 9, 32, generator=g), torch.randn(1, 9, 32, generator=g)
    atol = 0.0 if beams == 1 else 1e-6
    with torch.no_grad():
        for memory in (first, second, first):
            torch.testing.assert_close(_greedy_steps(cached, memory, beams), _greedy_steps(plain, memory, beams),
                                       atol=atol, rtol=0)
        first.mul_(-1)  # same tensor, new values: the version counter invalidates the entry
        torch.testing.assert_close(_greedy_steps(cached, first, beams), _greedy_steps(plain, first, beams),
                                   atol=atol, rtol=0)
    with torch.inference_mode():  # how asr_inference runs: tensors without version counters
        third = torch.randn(1, 9, 32, generator=g)
        for memory in (third, second):
            torch.testing.assert_close(_greedy_steps(cached, memory, beams), _greedy_steps(plain, memory, beams),
                                       atol=atol, rtol=0)
    assert cached.state_dict().keys() == plain.state_dict().keys()


def test_source_attention_cache_stays_out_of_training_and_autograd():
    from espnet_compress.models.memory_cache import cache_source_attention

    decoder = _decoder()
    cache_source_attention(decoder)
    memory = torch.randn(1, 9, 32, requires_grad=True)
    _greedy_steps(decoder, memory, beams=1, steps=2).sum().backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0
    assert all(getattr(layer.src_attn, "_source_cache", None) is None for layer in decoder.decoders)


def test_packed_load_caches_the_decoders_source_attention(tmp_path, monkeypatch):
    from espnet_compress.models.decoder_step import LeanDecoderStep
    from espnet_compress.models.memory_cache import CachedSourceAttention
    from espnet_compress.quant.packed import save_packed

    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", "dequant")
    save_packed(_model(), tmp_path / "m.pth")
    fresh = _model(seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=False)
    assert all(isinstance(layer.src_attn, CachedSourceAttention) for layer in fresh.decoder.decoders)
    assert isinstance(fresh.decoder, LeanDecoderStep) and isinstance(fresh.decoder, TransformerDecoder)


def test_packed_load_frees_the_fp32_weights_before_expanding_codes(tmp_path, monkeypatch):
    """The load's peak memory: by the time the first code is expanded, every weight the file holds
    as codes is already a zero-stride placeholder in the model (its fp32 storage freed for the
    codes to reuse); a strict load still succeeds (the coded keys are taken off the missing list)
    and gives the file's model exactly."""
    import espnet_compress.quant.packed as packed_module

    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", "dequant")
    qat = _model()
    reference = _outputs(qat)
    packed_module.save_packed(qat, tmp_path / "m.pth")
    fresh = _model(seed=1)
    coded = [r["name"] for r in json.loads(torch.load(tmp_path / "m.pth", weights_only=True)[MAGIC])["tensors"]
             if r["bits"]]
    params = dict(fresh.named_parameters())
    released_first = []
    original_unpack = packed_module.unpack

    def unpack(*args: Any, **kwargs: Any) -> Any:
        released_first.append(all(not any(params[name].stride()) for name in coded))
        return original_unpack(*args, **kwargs)

    monkeypatch.setattr(packed_module, "unpack", unpack)
    fresh.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=True)
    assert coded and released_first and all(released_first)
    assert torch.equal(_outputs(fresh), reference)


def _cache_only(model: torch.nn.Module) -> None:
    from espnet_compress.models.memory_cache import cache_source_attention

    assert cache_source_attention(model) == 1


def _all_decode_time_paths(model: torch.nn.Module) -> None:
    from espnet_compress.quant.packed import decode_time_paths

    cached, unmasked, lean = decode_time_paths(model)
    assert (cached, lean) == (1, 1) and unmasked > 2


@pytest.mark.parametrize("change", [_cache_only, _all_decode_time_paths], ids=["source-cache", "decode-time-paths"])
def test_decode_time_changes_keep_espnets_beam_search_results(change):
    """In ESPnet's own batch beam search (what asr_inference runs: beams expanded from one encoder
    output, CTC prefix scorer), the source attention cache alone and everything a packed load does
    besides quantization (cache, skipped masks, lean decoder step): the same hypotheses, scores equal
    up to float rounding."""
    from espnet.nets.batch_beam_search import BatchBeamSearch
    from espnet.nets.scorers.ctc import CTCPrefixScorer

    def search(model: CompressedASRModel) -> list:
        beam = BatchBeamSearch(scorers={"decoder": model.decoder, "ctc": CTCPrefixScorer(model.ctc, model.eos)},
                               weights={"decoder": 0.7, "ctc": 0.3}, beam_size=3, vocab_size=VOCAB, sos=model.sos,
                               eos=model.eos, token_list=model.token_list, pre_beam_score_key="full").eval()
        x = torch.randn(1, 40, FEAT, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            enc, _ = model.encode(x, torch.tensor([40]))
            return beam(enc[0], maxlenratio=0.0, minlenratio=0.0)

    plain = search(_model())
    changed_model = _model()
    change(changed_model)
    changed = search(changed_model)
    assert [h.yseq.tolist() for h in changed] == [h.yseq.tolist() for h in plain]
    torch.testing.assert_close(torch.stack([h.score for h in changed]), torch.stack([h.score for h in plain]),
                               atol=1e-4, rtol=0)


def test_speed_benchmark_refuses_a_negative_beam_before_writing(tmp_path, capsys):
    speed = benchmark("speed")

    with pytest.raises(SystemExit):
        speed.main(["--beam", "-1", "--out", str(tmp_path / "out")])
    assert "--beam -1: a beam size is >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interleaved_speed_table_reports_min_and_median_ratios():
    """The side-by-side tables (encoder, full decode): ratios of the fastest and of the median round
    against fp32."""
    speed = benchmark("speed")

    result = {"cpu": "test CPU", "rounds": 3,
              "encoder_s": {"fp32": {"2.0": [0.30, 0.20, 0.25]}, "packed8_auto": {"2.0": [0.10, 0.20, 0.125]}},
              "decode_s": {"fp32": {"2.0": [0.90, 0.60, 0.75]}, "packed8_auto": {"2.0": [0.20, 0.40, 0.30]}}}
    table = speed._interleaved_table(result, [2.0], "avx2", "greedy, 3 tokens per second of audio")
    encoder, decode = table.split("| config | decode")
    assert "| fp32 | 200 / 250 (1.00 / 1.00x) |" in encoder
    assert "| packed8_auto | 100 / 125 (2.00 / 2.00x) |" in encoder
    assert "| fp32 | 600 / 750 (1.00 / 1.00x) |" in decode
    assert "| packed8_auto | 200 / 300 (3.00 / 2.50x) |" in decode
    assert "--isa avx2" in table and "3 rounds" in table and "greedy, 3 tokens" in table


def test_attention_without_masks_that_mask_nothing_is_bit_identical(monkeypatch):
    """``skip_full_masks``: an all-true mask is dropped (no masked_fill runs), a mask with padding
    is kept; both give exactly ESPnet's outputs; training keeps ESPnet's path."""
    from espnet.nets.pytorch_backend.transformer.attention import MultiHeadedAttention

    from espnet_compress.models.full_masks import skip_full_masks

    model = _model().eval()
    reference = _outputs(model)  # a padded batch: masks with false entries
    g = torch.Generator().manual_seed(4)
    x, lens = torch.randn(1, 40, FEAT, generator=g), torch.tensor([40])
    with torch.no_grad():
        one = model.encode(x, lens)[0]
    count = skip_full_masks(model)
    assert count == sum(isinstance(m, MultiHeadedAttention) for m in model.modules()) > 0
    assert skip_full_masks(model) == 0  # idempotent
    fills = []
    monkeypatch.setattr(torch.Tensor, "masked_fill", lambda self, *a: fills.append(1) or torch.Tensor.masked_fill_(self.clone(), *a))
    with torch.no_grad():
        assert torch.equal(model.encode(x, lens)[0], one)  # one utterance: full masks
    assert not fills
    with torch.no_grad():
        assert torch.equal(_outputs(model), reference)
    assert fills  # padding: ESPnet's masked path
    fills.clear()
    model.train()
    model.encode(x, lens)
    assert fills  # training: ESPnet's path


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats 0: at least one timed run"),
    (["--seconds", "2", "0"], "--seconds 2 0: utterance lengths are > 0"),
])
def test_speed_benchmark_refuses_impossible_runs_before_writing(tmp_path, capsys, args, message):
    speed = benchmark("speed")

    with pytest.raises(SystemExit):
        speed.main([*args, "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _lean(decoder: TransformerDecoder) -> TransformerDecoder:
    from espnet_compress.models.decoder_step import lean_decoder_steps
    from espnet_compress.models.memory_cache import cache_source_attention

    cache_source_attention(decoder)
    assert lean_decoder_steps(decoder) == 1
    assert lean_decoder_steps(decoder) == 0  # idempotent
    return decoder


@pytest.mark.parametrize("beams", [1, 3])
def test_lean_decoder_step_equals_espnets_step(beams, monkeypatch):
    """The lean step is ESPnet's arithmetic in fewer calls: bit for bit with one hypothesis; with
    beams sharing one cached source their queries are rows of one product per head (float
    rounding, as the source cache's own test). It must actually run (no ESPnet layer is called)."""
    from espnet.nets.pytorch_backend.transformer.decoder_layer import DecoderLayer

    plain, lean = _decoder(), _lean(_decoder())
    assert isinstance(lean, TransformerDecoder)
    memory = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = _greedy_steps(plain, memory, beams, steps=5)
        layer_calls = []
        monkeypatch.setattr(DecoderLayer, "forward", lambda *a, **k: layer_calls.append(1))
        got = _greedy_steps(lean, memory, beams, steps=5)
    assert not layer_calls
    torch.testing.assert_close(got, reference, atol=0.0 if beams == 1 else 1e-6, rtol=0)
    assert lean.state_dict().keys() == plain.state_dict().keys()


def test_lean_decoder_step_leaves_masked_steps_training_and_other_layouts_to_espnet():
    """A step whose last mask row masks something, a padded source, a first step of several tokens,
    autograd and training all run ESPnet's own step (same results); a post-norm decoder is not
    changed at all, with the reason."""
    from espnet_compress.models.decoder_step import lean_decoder_steps, unsupported_layout

    plain, lean = _decoder(), _lean(_decoder())
    g = torch.Generator().manual_seed(6)
    memory, ys = torch.randn(2, 9, 32, generator=g), torch.randint(1, VOCAB - 1, (2, 4), generator=g)
    masked = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    masked[1, -1, 0] = False
    source_mask = torch.ones(2, 1, 9, dtype=torch.bool)
    source_mask[1, 0, 7:] = False
    with torch.no_grad():
        for tgt_mask, memory_mask in ((masked, None), (torch.ones(2, 4, 4, dtype=torch.bool).tril(), source_mask)):
            torch.testing.assert_close(lean.forward_one_step(ys, tgt_mask, memory, memory_mask)[0],
                                       plain.forward_one_step(ys, tgt_mask, memory, memory_mask)[0], atol=0, rtol=0)
    lean.train()
    out, _ = lean.forward_one_step(ys, masked, memory.requires_grad_())
    out.sum().backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0
    torch.manual_seed(0)
    post_norm = TransformerDecoder(VOCAB, 32, attention_heads=4, linear_units=48, num_blocks=1, normalize_before=False)
    assert unsupported_layout(post_norm) == "not a pre-norm decoder (normalize_before false)"
    assert lean_decoder_steps(post_norm) == 0 and type(post_norm) is TransformerDecoder
