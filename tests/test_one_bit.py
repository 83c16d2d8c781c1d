"""One- and two-bit ASR (issue 15): the std-alpha quantizer, trit packing, stochastic precision and
co-training through the multi-system model.

Hand-computed cases fix the quantizer's levels and its alpha gradient; the model-level tests use a
3-block Conformer small enough to run a training step in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from espnet_compress.quant.api import QuantConfig, quantize_, quantized_modules
from espnet_compress.quant.bitpack import nbytes, pack, pack_codes, unpack, unpack_codes
from espnet_compress.quant.packed import PackedModelError, load_packed
from espnet_compress.quant.quantizers import QUANTIZERS, StdScaleQuantizer, UnsupportedBitWidth
from tests.conftest import REPO, benchmark

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


# ------------------------------------------------------------------------------ models
from espnet_compress.models.systems import SystemSpecError, authors_schedule, mix_rules  # noqa: E402
from tests.test_nested import ENC, batch, build  # noqa: E402

B2 = {"encoders.*.conv_module.*": 4, "*": 2}
B1 = {"encoders.*.conv_module.*": 4, "*": 1}
ENC1 = dict({k: v for k, v in ENC.items() if k != "quant_conf"},
            quant_conf={"bits": B2, "method": "std_alpha", "bit_choices": [1], "exclude": ["embed.*"]})
DEC_Q = {"bits": 4, "method": "std_alpha"}
CO_TRAINING = {
    "bit2": {"bits": B2, "decoder_bits": 4},
    "bit1": {"bits": B1, "weight": 0.5, "decoder_bits": 4},
    "mix": {"bits": B2, "stochastic_bits": {"low": 1, "high": 2}, "weight": 0.5, "decoder_bits": 4},
}


def co_trained(asr_task, tmp_path, systems=CO_TRAINING, **conf):
    model_conf = dict(decoder_quant=DEC_Q, systems=systems, kl_weight=1.0, kl_target="hybrid",
                      kl_reduction="utterance")
    model_conf.update(conf)
    return build(asr_task, tmp_path, enc=ENC1, **model_conf)


def _block_bits(model, plan=None) -> List[Tuple[int, ...]]:
    """Bits of every quantized module per block (conv modules excluded) under ``plan``."""
    enc = model.encoder
    if plan is not None:
        enc.set_plan(plan)
    out = []
    for b in range(enc.num_physical_blocks):
        mods = {n: m for n, m in quantized_modules(enc).items()
                if n.startswith(f"{enc.block_name(b)}.") and ".conv_module." not in n}
        out.append(tuple(sorted({m.bits for m in mods.values()})))
    return out


def test_authors_schedule_is_log_spaced_and_rescaled_to_depth():
    twelve = authors_schedule(12)
    np.testing.assert_allclose(twelve, [0.305, 0.377, 0.445, 0.508, 0.567, 0.623, 0.676, 0.726, 0.774, 0.820,
                                        0.863, 0.905], atol=1.5e-3)  # the fact sheet's values
    four = authors_schedule(4)
    assert len(four) == 4 and four[0] == pytest.approx(twelve[0]) and four[-1] == pytest.approx(twelve[-1])
    assert list(four) == sorted(four)


def test_stochastic_draws_are_reproducible_and_equal_on_two_simulated_ranks(asr_task, tmp_path):
    """Two 'ranks': separately built models with different torch RNG states (data order, dropout)
    train three steps; the mixed system runs the same per-layer precisions on both, namely the
    draw for (sampling_seed, step), whatever torch's RNG did."""
    seen: Dict[int, List[List[Tuple[int, ...]]]] = {}
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
        model = co_trained(asr_task, tmp_path / f"rank{rank}")
        model.train()
        torch.manual_seed(100 + rank)
        record: List[List[Tuple[int, ...]]] = []

        def hook(module, inputs, model=model, record=record):
            if model.active_system == "mix":
                record.append(_block_bits(model))

        model.encoder.register_forward_pre_hook(hook)
        for _ in range(3):
            loss, _, _ = model(**batch())
            loss.backward()
        seen[rank] = record
        spec = model.systems["mix"]
        # after the steps the teacher's plan is active and the mix's statistics plan is its declared one
        assert model.encoder.plan == model.systems["bit2"].plan
        assert model.encoder.blocks.stats_plans["mix"] == spec.plan
        expected = [_block_bits(model, spec.plan_for_step(model.encoder, step, 0)) for step in range(3)]
        assert record == expected
    assert seen[0] == seen[1]
    # a different sampling seed draws another sequence; the draw frequencies follow the schedule
    spec = model.systems["mix"]
    draws = np.array([spec.stochastic.draw(step, 0, "mix") for step in range(3000)])
    np.testing.assert_allclose(draws.mean(axis=0), authors_schedule(3), atol=0.04)
    assert [spec.stochastic.draw(s, 1, "mix") for s in range(40)] != [spec.stochastic.draw(s, 0, "mix") for s in range(40)]


def test_a_stochastic_system_decodes_its_most_likely_mix_and_any_fixed_mix_is_a_plan(asr_task, tmp_path):
    model = co_trained(asr_task, tmp_path)
    probs = authors_schedule(3)  # [0.305, 0.64, 0.905]: blocks 1 and 2 are more likely 1-bit
    assert [p >= 0.5 for p in probs] == [False, True, True]
    model.use_system("mix")
    assert _block_bits(model) == [(2,), (1,), (1,)]
    conv = [m.bits for n, m in quantized_modules(model.encoder).items() if ".conv_module." in n]
    assert set(conv) == {4}  # the conv module keeps its fixed precision in every mix
    # "1.5-bit" at decode time: the first half of the layers 1-bit, a plain plan (or ESPNET_COMPRESS_PLAN)
    half = {"encoders.*.conv_module.*": 4, "encoders.0.*": 1, "*": 2}
    assert _block_bits(model, {"bits": half}) == [(1,), (2,), (2,)]
    rules = mix_rules(model.encoder, (0, 1, 2), tuple(B2.items()), [True, False, False], 1, 2)
    assert _block_bits(model, {"bits": [list(r) for r in rules]}) == [(1,), (2,), (2,)]
    assert model.systems["mix"].to_config()["stochastic_bits"] == {"low": 1, "high": 2, "probs": list(probs)}


@pytest.mark.parametrize("stochastic,needle", [
    ({"probs": [0.5, 1.2, 0.1]}, r"mix.stochastic_bits.probs\[1\]: a probability must lie in \[0, 1\], got 1.2"),
    ({"probs": [-0.1, 0.2, 0.3]}, r"probs\[0\]: a probability must lie in \[0, 1\]"),
    ({"probs": [0.5, 0.5]}, r"mix.stochastic_bits.probs: 2 probabilities for a plan of 3 layers"),
    ({"probs": "half"}, r"expected a list of 3 probabilities"),
    ({"low": 3}, r"mix.stochastic_bits.low: 3 bits is not among the widths the quantizer of .* was built for \[1, 2, 4\]"),
    ({"low": 7}, r"unsupported bit width 7 for model_conf.systems.mix.stochastic_bits.low"),
    ({"low": 2}, r"low and high are both 2"),
    ({"high": 8}, r"no quantized module of the plan's blocks is at high=8 bits"),
    ({"rate": 1.8}, r"unknown field\(s\) \['rate'\]"),
])
def test_bad_stochastic_schedules_name_the_system_and_field(asr_task, tmp_path, stochastic, needle):
    systems = dict(CO_TRAINING, mix=dict(CO_TRAINING["mix"], stochastic_bits=stochastic))
    with pytest.raises(SystemSpecError, match=needle):
        co_trained(asr_task, tmp_path, systems=systems)


def test_a_stochastic_system_refuses_a_repeated_block(asr_task, tmp_path):
    systems = dict(CO_TRAINING, mix=dict(CO_TRAINING["mix"], blocks=[0, 1, 1]))
    with pytest.raises(SystemSpecError, match=r"runs a block more than once \(\[0, 1, 1\]\)"):
        co_trained(asr_task, tmp_path, systems=systems)


def test_co_training_with_kl_weight_0_and_one_system_equals_plain_qat(asr_task, tmp_path):
    """One system = plain QAT (same loss, same gradients); 2-bit teacher + 1-bit student with
    kl_weight 0 = L_2bit + w L_1bit of two plain QAT models."""
    def plain(bits):
        enc = dict(ENC1, quant_conf=dict(ENC1["quant_conf"], bits=bits))
        model = build(asr_task, tmp_path, enc=enc, decoder_quant=DEC_Q, systems=None)
        model.train()
        loss, _, _ = model(**batch())
        loss.backward()
        return model, loss

    def grads(model):
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    p2, l2 = plain(B2)
    p1, l1 = plain(B1)
    one = co_trained(asr_task, tmp_path, systems={"bit2": CO_TRAINING["bit2"]}, kl_weight=0.0)
    one.train()
    loss, _, _ = one(**batch())
    loss.backward()
    torch.testing.assert_close(loss, l2)
    g, g2 = grads(one), grads(p2)
    assert g.keys() == g2.keys()
    for n in g:
        torch.testing.assert_close(g[n], g2[n], msg=n)

    two = co_trained(asr_task, tmp_path, systems={k: CO_TRAINING[k] for k in ("bit2", "bit1")}, kl_weight=0.0)
    two.train()
    loss, stats, _ = two(**batch())
    loss.backward()
    torch.testing.assert_close(stats["loss_bit1"], l1.detach())
    torch.testing.assert_close(loss, l2 + 0.5 * l1)
    g, g1 = grads(two), grads(p1)
    for n in g:
        expected = g2.get(n, 0) + 0.5 * g1.get(n, 0)
        torch.testing.assert_close(g[n], expected, msg=n, rtol=1e-4, atol=1e-6)


def test_co_training_loss_is_the_authors_form(asr_task, tmp_path):
    """L = L_2bit + sum_i lambda1 L_i + lambda2 (ctc_weight KL_ctc + (1 - ctc_weight) KL_att) per
    utterance; the KL reaches the students only, every alpha of the used widths learns."""
    model = co_trained(asr_task, tmp_path)
    model.train()
    loss, stats, _ = model(**batch())
    loss.backward()
    expected = stats["loss_bit2"] + 0.5 * (stats["loss_bit1"] + stats["loss_mix"]) + stats["kl_bit1"] + stats["kl_mix"]
    torch.testing.assert_close(stats["loss"], expected)
    assert float(stats["kl_bit1"]) > 0 and float(stats["kl_mix"]) > 0
    qz = model.encoder.encoders[0].feed_forward.w_1.weight_quantizer
    assert qz.alphas["alpha_1bit"].grad is not None and qz.alphas["alpha_2bit"].grad is not None
    conv = model.encoder.encoders[0].conv_module.pointwise_conv1.weight_quantizer
    assert conv.alphas["alpha_4bit"].grad is not None


def test_system_loss_mean_divides_the_sum_by_the_systems_of_the_step(asr_task, tmp_path):
    """The authors' mean of the three losses: the same step (same draws, same dropout) as the sum,
    divided by 3, with every per-system stat unchanged; unknown reductions and a reduction without
    systems are refused by name."""
    runs = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        model = co_trained(asr_task, tmp_path, system_loss=reduction)
        model.train()
        runs[reduction] = model(**batch())[1]
    for key in ("loss_bit2", "loss_bit1", "loss_mix", "kl_bit1", "kl_mix"):
        torch.testing.assert_close(runs["mean"][key], runs["sum"][key], msg=key)
    torch.testing.assert_close(runs["mean"]["loss"], runs["sum"]["loss"] / 3)
    with pytest.raises(SystemSpecError, match=r"system_loss: 'max' unknown; allowed: \['sum', 'mean'\]"):
        co_trained(asr_task, tmp_path, system_loss="max")
    with pytest.raises(SystemSpecError, match="system_loss need model_conf.systems"):
        build(asr_task, tmp_path, enc=ENC1, systems=None, system_loss="mean")


def test_hybrid_kl_weights_ctc_and_attention_like_espnet_and_reduces_per_utterance(asr_task, tmp_path):
    model = co_trained(asr_task, tmp_path)
    g = torch.Generator().manual_seed(0)
    teacher = {"decoder": torch.randn(2, 4, 5, generator=g), "ctc_logits": torch.randn(2, 6, 5, generator=g),
               "ctc_lens": torch.tensor([6, 3])}
    student = {k: (v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
               for k, v in teacher.items()}
    text_lengths = torch.tensor([3, 1])
    parts = {}
    for target in ("ctc", "decoder"):
        model.kl_target = target
        parts[target] = model._kl(teacher, student, text_lengths)
    model.kl_target = "hybrid"
    torch.testing.assert_close(model._kl(teacher, student, text_lengths), 0.3 * parts["ctc"] + 0.7 * parts["decoder"])
    # by hand: per-frame KL summed over the 6 + 3 real frames, divided by the batch size 2
    log_t, log_s = teacher["ctc_logits"].log_softmax(-1), student["ctc_logits"].log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    torch.testing.assert_close(parts["ctc"], (kl[0].sum() + kl[1, :3].sum()) / 2)
    model.kl_reduction = "token"
    model.kl_target = "ctc"
    torch.testing.assert_close(model._kl(teacher, student, text_lengths), (kl[0].sum() + kl[1, :3].sum()) / 9)
    with pytest.raises(SystemSpecError, match=r"kl_reduction: 'frame' unknown; allowed: \['token', 'utterance'\]"):
        co_trained(asr_task, tmp_path, kl_reduction="frame")
    with pytest.raises(SystemSpecError, match="kl_target 'hybrid' needs CTC"):
        co_trained(asr_task, tmp_path, ctc_weight=0.0)


# ------------------------------------------------------------------------------ packed models
from espnet_compress.export import export_packed  # noqa: E402
from espnet_compress.quant.packed import MAGIC, _digest  # noqa: E402
from tests.test_export import ENCODER_CONF, _encode, _write_experiment  # noqa: E402


@pytest.fixture(scope="module")
def packed_models(asr_task, tmp_path_factory) -> Dict[str, argparse.Namespace]:
    """1-bit and ternary (2-bit, stored as trits and as 2-bit fields) std-alpha QAT models with
    trained-looking alphas, their exports, and an input."""
    out = {}
    for name, bits, packing in (("bit1", 1, "bits"), ("bit2_trits", 2, "trits"), ("bit2", 2, "bits")):
        enc = dict(ENCODER_CONF, quant_conf={"bits": {"encoders.*.conv_module.*": 4, "*": bits},
                                             "method": "std_alpha", "exclude": ["embed.*"]})
        exp = _write_experiment(asr_task, tmp_path_factory.mktemp(name) / "asr", "quantized_conformer", enc,
                                "compressed", {"ctc_weight": 0.3, "decoder_quant": DEC_Q})
        g = torch.Generator().manual_seed(bits)
        with torch.no_grad():
            for pname, p in exp.model.named_parameters():
                if ".alphas." in pname:
                    p.copy_(0.5 + torch.rand((), generator=g))
        torch.save(exp.model.state_dict(), exp.checkpoint)
        exp.export = export_packed(exp.config, exp.checkpoint, exp.root / "packed", ternary_packing=packing)
        exp.bits, exp.packing = bits, packing
        out[name] = exp
    return out


@pytest.mark.parametrize("name", ["bit1", "bit2_trits", "bit2"])
@pytest.mark.parametrize("kernel", ["dequant", "auto"])
def test_packed_one_and_two_bit_models_compute_what_the_fake_quant_model_computed(packed_models, name, kernel,
                                                                                monkeypatch):
    from espnet2.bin.asr_inference import Speech2Text

    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", kernel)
    exp = packed_models[name]
    speech = torch.randn(1, 64, 20, generator=torch.Generator().manual_seed(1))
    s2t = Speech2Text(asr_train_config=str(exp.export.config_file), asr_model_file=str(exp.export.packed_file),
                      device="cpu", beam_size=2, ctc_weight=0.3, nbest=1, maxlenratio=0.0)
    assert not any(hasattr(m, "weight_quantizer") for m in s2t.asr_model.modules())  # frozen at load
    reference = _encode(exp.model, speech)
    tol = 1e-6 if kernel == "dequant" else 1e-4
    torch.testing.assert_close(_encode(s2t.asr_model, speech), reference, atol=tol, rtol=0)
    # the bytes: 1 bit = 8 codes per byte, trits = 5 per byte, ternary 2-bit fields = 4 per byte (+ 4 B scale)
    header = load_packed(exp.export.packed_file).header
    per_byte = {"bit1": 8, "bit2_trits": 5, "bit2": 4}[name]
    recs = [r for r in header["tensors"] if r["bits"] == exp.bits]
    assert recs and all(r["nbytes"] == math.ceil(np.prod(r["shape"]) / per_byte) + 4 for r in recs)
    assert all(r.get("packing", "bits") == exp.packing for r in recs)


def _relabel(src: Path, dst: Path, change) -> None:
    """A packed file whose header was edited and re-signed: only the record checks can notice."""
    state = torch.load(src, weights_only=True)
    header = json.loads(state[MAGIC])
    change(header)
    header["sha256"] = _digest(header, state["blob"].numpy().tobytes())
    state[MAGIC] = json.dumps(header)
    torch.save(state, dst)


@pytest.mark.parametrize("name,change,needle", [
    ("bit1", lambda h: next(r for r in h["tensors"] if r["bits"] == 1).update(bits=2),
     r"tensor 'encoder\.encoders\.0\..*': \d+ bytes in the header, but shape \[\d+, \d+\] at 2-bit \(bits\) takes"),
    ("bit2_trits", lambda h: next(r for r in h["tensors"] if r["bits"] == 2).pop("packing"),
     r"\d+ bytes in the header, but shape .* at 2-bit \(bits\) takes"),
    ("bit2_trits", lambda h: next(r for r in h["tensors"] if r["bits"] == 2).update(bits=4),
     r"trit packing holds ternary \(2-bit\) codes, not 4-bit ones"),
    ("bit2_trits", lambda h: next(r for r in h["tensors"] if r["bits"] == 2).update(packing="base4"),
     r"unknown code packing 'base4'"),
], ids=["1bit-as-2bit", "trits-as-2bit-fields", "trits-as-4bit", "unknown-packing"])
def test_a_code_width_that_disagrees_with_the_header_is_refused(packed_models, tmp_path, name, change, needle):
    bad = tmp_path / "bad.pth"
    _relabel(packed_models[name].export.packed_file, bad, change)
    with pytest.raises(PackedModelError, match=needle) as err:
        load_packed(bad)
    assert str(bad) in str(err.value)


def test_co_trained_systems_and_a_fixed_mix_export_packed_and_compute_what_they_computed_inside(
        asr_task, tmp_path, monkeypatch):
    """export_system of the 1-bit system and of a "1.5-bit" plan (first half 1-bit, decoder 4-bit,
    ternary as trits): stock Speech2Text on the packed file = the system inside the co-trained model."""
    from espnet2.bin.asr_inference import Speech2Text

    from espnet_compress.export.system_export import export_system

    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", "dequant")
    enc = dict(ENCODER_CONF, quant_conf=ENC1["quant_conf"])
    exp = _write_experiment(asr_task, tmp_path / "asr", "quantized_conformer", enc, "compressed",
                            {"ctc_weight": 0.3, "decoder_quant": DEC_Q, "systems": CO_TRAINING, "largest": "bit2",
                             "kl_target": "hybrid", "kl_reduction": "utterance", "kl_weight": 1.0})
    model = exp.model
    model.train()
    speech = torch.randn(2, 64, 20, generator=torch.Generator().manual_seed(1))
    loss, _, _ = model(speech.clone(), torch.tensor([64, 50]), torch.tensor([[2, 3, 2], [3, 2, -1]]),
                       torch.tensor([3, 2]))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.05)
    model.eval()
    torch.save(model.state_dict(), exp.checkpoint)
    half = [i < model.encoder.num_physical_blocks // 2 for i in range(model.encoder.num_physical_blocks)]
    rules = mix_rules(model.encoder, model.systems["bit2"].plan.blocks, tuple(B2.items()), half, 1, 2)
    one_speech = speech[:1]
    for name, kwargs in (("bit1", {"system": "bit1"}),
                         ("mix15", {"system": None, "plan": {"name": "mix15", "bits": [list(r) for r in rules]},
                                    "plan_decoder_bits": 4, "ternary_packing": "trits"})):
        res = export_system(exp.config, exp.checkpoint, out_dir=tmp_path / name, **kwargs)
        assert res.packed
        s2t = Speech2Text(asr_train_config=str(res.config), asr_model_file=str(res.model_file), device="cpu",
                          beam_size=2, ctc_weight=0.3, nbest=1, maxlenratio=0.0)
        if name == "bit1":
            model.use_system("bit1")
        else:
            model.use_system("bit2")
            model.encoder.set_plan({"name": "mix15", "bits": [list(r) for r in rules]})
            set_decoder = [m.bits for m in quantized_modules(model.decoder).values()]
            assert set(set_decoder) == {4}
        torch.testing.assert_close(_encode(s2t.asr_model, one_speech), _encode(model, one_speech), atol=1e-5, rtol=0)
        header = load_packed(res.model_file).header
        widths = {r["bits"] for r in header["tensors"] if r["name"].startswith("encoder.")}
        assert widths == ({0, 1, 4} if name == "bit1" else {0, 1, 2, 4})
        assert {r["bits"] for r in header["tensors"] if r["name"].startswith("decoder.")} == {0, 4}


# ------------------------------------------------------------------------------ bytes at any size
def test_size_benchmark_exports_every_layout(tmp_path):
    """``benchmarks/one_bit_size.py`` (the paper-size byte table) on the tiny configs: every system
    exports through ``export_system``, and the bytes fall where the layouts say they must."""
    one_bit_size = benchmark("one_bit_size")
    conf = REPO / "conf" / "spoken_commands"
    assert one_bit_size.main(["--out", str(tmp_path), "--vocab", "20",
                              "--config", str(conf / "train_asr_one_bit_cotrain_tiny.yaml"),
                              "--fp32_config", str(conf / "train_asr_conformer_tiny.yaml")]) == 0
    rows = {r["system"]: r for r in json.loads((tmp_path / "one_bit_size.json").read_text())}
    assert rows["bit1"]["blocks"] < rows["mix15"]["blocks"] < rows["bit2"]["blocks"] < rows["fp32"]["blocks"] / 8
    assert rows["bit1_conv1"]["blocks"] < rows["bit1"]["blocks"]  # the 4-bit conv modules at 1 bit
    # the decoder's precision changes the file, not the encoder
    assert rows["bit1_fp_decoder"]["encoder"] == rows["bit1"]["encoder"]
    assert rows["bit1_fp_decoder"]["file"] > rows["bit1"]["file"]
    # quantizing the front end leaves the blocks alone and shrinks the float part to biases and norms
    assert rows["bit1_front4"]["blocks"] == rows["bit1"]["blocks"]
    assert rows["bit1_front4"]["by_width"]["fp32"] < rows["bit1"]["by_width"]["fp32"] / 5
    assert rows["bit1_front4"]["file"] < rows["bit1"]["file"]
    assert set(rows["bit1"]["by_width"]) == {"1-bit", "4-bit", "fp32"}
    # everything at 1 bit (front end and conv modules too): the encoder stores no other code width
    assert set(rows["bit1_all"]["by_width"]) == {"1-bit", "fp32"}
    assert rows["bit1_all"]["encoder"] < rows["bit1_front4_conv1"]["encoder"]
    assert rows["bit1_all"]["blocks"] == rows["bit1_conv1"]["blocks"]
    # the first convolution in float: 1 x 3 x 3 weights per output channel (d 96) move from 1 bit to fp32
    first_conv = 96 * 9
    grown = rows["bit1_all_fc"]["by_width"]["fp32"] - rows["bit1_all"]["by_width"]["fp32"]
    assert grown == 4 * first_conv
    assert rows["bit1_all"]["encoder"] < rows["bit1_all_fc"]["encoder"] < rows["bit1_all"]["encoder"] + 4 * first_conv
    assert rows["bit1_all_fc"]["blocks"] == rows["bit1_all"]["blocks"]
    assert set(rows["bit2"]["by_width"]) == {"2-bit", "4-bit", "fp32"}


def test_one_bit_benchmark_refuses_contradictory_options_before_writing(tmp_path, capsys):
    """``benchmarks/one_bit.py``: a warm start without the stage length, training the ablation it was
    told to skip or the all-1-bit model it was not told to train, or a model_conf override without a value stops at parse time with the option named,
    before a corpus or a training exists."""
    one_bit = benchmark("one_bit")

    exp = tmp_path / "exp"
    for argv, needle in ((["--warm_start"], "--warm_start needs --max_epoch"),
                         (["--skip_nostoch", "--train_only", "co", "nostoch"], "--train_only nostoch contradicts"),
                         (["--train_only", "teacher"], "invalid choice: 'teacher'"),
                         (["--train_only", "alone_1bit_all"], "--train_only alone_1bit_all needs --all_1bit"),
                         (["--float_first_conv"], "--float_first_conv is a variant of --all_1bit's layout"),
                         (["--all_1bit", "--train_only", "alone_1bit_all_fc"],
                          "--train_only alone_1bit_all_fc needs --all_1bit --float_first_conv"),
                         (["--co_model_conf", "kl_weight"], "--co_model_conf ['kl_weight']: expected KEY=VALUE")):
        with pytest.raises(SystemExit):
            one_bit.main(["--exp_dir", str(exp), *argv])
        assert needle in capsys.readouterr().err
    assert not exp.exists()
