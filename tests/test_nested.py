"""The multi-system (all-in-one) model: spec validation, loss, KL stop-gradient, sampling."""
from __future__ import annotations

import pytest
import torch

from espnet_compress.models.systems import SystemSampler, SystemSpecError
from tests.test_registration import _build_args

ENC = {"output_size": 32, "attention_heads": 2, "linear_units": 48, "num_blocks": 3, "dropout_rate": 0.0,
       "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0, "input_layer": "conv2d",
       "macaron_style": True, "rel_pos_type": "latest", "pos_enc_layer_type": "rel_pos",
       "selfattention_layer_type": "rel_selfattn", "cnn_module_kernel": 5,
       "quant_conf": {"bits": 0, "bit_choices": [4, 8]}}
SYSTEMS = {"full": {}, "shallow": {"blocks": [0, 2]}, "narrow": {"ffn_units": 24},
           "int4": {"bits": 4, "decoder_bits": 4}}


def build(asr_task, tmp_path, encoder="quantized_conformer", enc=None, **model_conf):
    args = _build_args(asr_task, tmp_path, dict(enc or ENC))
    args.encoder = encoder
    args.model = "compressed"
    conf = {"ctc_weight": 0.3, "decoder_quant": {"bits": 0, "bit_choices": [4, 8]}, "systems": SYSTEMS}
    conf.update(model_conf)
    args.model_conf = conf
    torch.manual_seed(0)
    return asr_task.ASRTask.build_model(args)


def batch():
    torch.manual_seed(3)
    speech = torch.randn(2, 60, 20)
    return dict(speech=speech, speech_lengths=torch.tensor([60, 48]),
                text=torch.tensor([[2, 3, 2], [3, 2, -1]]), text_lengths=torch.tensor([3, 2]))


@pytest.mark.parametrize(
    "systems,needle",
    [
        ({"a": {"blocks": [0, 3]}}, "model_conf.systems.a: plan 'a': blocks names block 3"),
        ({"a": {"ffn_units": 96}}, "model_conf.systems.a: plan 'a': ffn_units 96 is outside 1..48"),
        ({"a": {"bits": 7}}, "unsupported bit width 7"),
        ({"a": {"bits": 2}}, "bits 2 for 'embed.out.0' is not among the widths"),
        ({"a": {"decoder_bits": 3}}, "decoder_bits 3 is not among decoder_quant's widths"),
        ({"a": {"layers": 2}}, "model_conf.systems.a: unknown field(s) ['layers']"),
        ({"a": {"depth": 2}}, "['depth'] need the 'fold' feature (encoder_conf.fold)"),
    ],
)
def test_bad_system_specs_name_system_and_field(asr_task, tmp_path, systems, needle):
    with pytest.raises(SystemSpecError) as err:
        build(asr_task, tmp_path, systems=systems)
    assert needle in str(err.value)


def test_unknown_decode_system_and_options(asr_task, tmp_path):
    with pytest.raises(SystemSpecError, match="unknown system 'nope'"):
        build(asr_task, tmp_path, decode_system="nope")
    with pytest.raises(SystemSpecError, match="kl_target"):
        build(asr_task, tmp_path, kl_target="encoder")
    with pytest.raises(SystemSpecError, match="sampling: unknown mode 'shuffle'"):
        build(asr_task, tmp_path, sampling="shuffle")
    with pytest.raises(SystemSpecError, match="num_random_systems"):
        build(asr_task, tmp_path, sampling="random", num_random_systems=-1)
    with pytest.raises(SystemSpecError, match="share_computation"):
        build(asr_task, tmp_path, share_computation="yes")


def test_forward_reports_every_system_and_one_loss(asr_task, tmp_path):
    model = build(asr_task, tmp_path)
    model.train()
    loss, stats, _ = model(**batch())
    loss.backward()
    for name in SYSTEMS:
        assert torch.isfinite(stats[f"loss_{name}"]).all()
        assert f"acc_{name}" in stats
    assert set(k for k in stats if k.startswith("kl_")) == {"kl_shallow", "kl_narrow", "kl_int4"}
    # the total is L_largest + sum w_i L_i + kl_weight * sum KL_i
    expected = sum(stats[f"loss_{n}"] for n in SYSTEMS) + 0.1 * sum(stats[f"kl_{n}"] for n in ("shallow", "narrow", "int4"))
    torch.testing.assert_close(stats["loss"], expected)
    assert model.active_system == "full" and model.encoder.plan.blocks == (0, 1, 2)


def test_kl_is_zero_for_a_copy_of_the_largest(asr_task, tmp_path):
    model = build(asr_task, tmp_path, systems={"full": {}, "same": {"blocks": [0, 1, 2]}})
    model.train()
    _, stats, _ = model(**batch())
    assert float(stats["kl_same"]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(stats["loss_same"], stats["loss_full"])


def test_no_gradient_reaches_the_largest_through_the_kl(asr_task, tmp_path):
    """Block 0 runs only in the teacher; its gradient must not depend on the KL weight."""
    grads = []
    for kl_weight in (0.0, 5.0):
        model = build(asr_task, tmp_path, systems={"full": {}, "tail": {"blocks": [1, 2], "weight": 0.0}},
                      kl_weight=kl_weight)
        model.train()
        loss, stats, _ = model(**batch())
        assert kl_weight == 0.0 or float(stats["kl_tail"]) > 0
        loss.backward()
        grads.append(model.encoder.encoders[0].feed_forward.w_1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_sampling_is_reproducible_and_sandwiched():
    a = SystemSampler(["l", "s", "x", "y", "z"], "l", "s", "sandwich", num_random=1, seed=7)
    b = SystemSampler(["l", "s", "x", "y", "z"], "l", "s", "sandwich", num_random=1, seed=7)
    draws = [a.draw(step) for step in range(50)]
    assert draws == [b.draw(step) for step in range(50)]
    assert all(d[:2] == ["l", "s"] and len(d) == 3 for d in draws)
    assert {d[2] for d in draws} == {"x", "y", "z"}
    assert draws != [SystemSampler(["l", "s", "x", "y", "z"], "l", "s", "sandwich", 1, seed=8).draw(s) for s in range(50)]


def test_random_sampling_draws_the_largest_and_others_evenly():
    sampler = SystemSampler(["l", "s", "x", "y"], "l", "s", "random", num_random=1, seed=0)
    draws = [sampler.draw(step) for step in range(300)]
    assert all(d[0] == "l" and len(d) == 2 for d in draws)
    counts = {n: sum(d[1] == n for d in draws) for n in ("s", "x", "y")}
    assert min(counts.values()) > 70, counts  # each of the 3 others about 100 times


def test_sandwich_training_steps_follow_the_sampler(asr_task, tmp_path):
    model = build(asr_task, tmp_path, sampling="sandwich", num_random_systems=1, sampling_seed=3)
    model.train()
    assert model.sampler.smallest == "int4"
    for step in range(3):
        drawn = model.sampler.draw(step)
        _, stats, _ = model(**batch())
        ran = {n for n in SYSTEMS if stats[f"loss_{n}"] is not None}
        assert ran == set(drawn)


def test_decode_system_selects_plan_and_env_override(asr_task, tmp_path, monkeypatch):
    model = build(asr_task, tmp_path, decode_system="shallow")
    assert model.encoder.plan.blocks == (0, 2)
    monkeypatch.setenv("ESPNET_COMPRESS_SYSTEM", "int4")
    model = build(asr_task, tmp_path, decode_system="shallow")
    assert model.active_system == "int4"
    assert all(m.bits == 4 for m in model.encoder.quantizable_modules().values())


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_computation_gives_the_same_losses_and_gradients(asr_task, tmp_path):
    """Sharing the input layer and common plan prefixes is exact (no dropout in ENC)."""
    results = []
    for share in (True, False):
        model = build(asr_task, tmp_path, share_computation=share)
        model.train()
        loss, stats, _ = model(**batch())
        loss.backward()
        results.append((stats, _grads(model), model.last_step_sharing))
    (shared_stats, shared_grads, (hits, misses)), (plain_stats, plain_grads, _) = results
    for key in ("loss", *(f"loss_{n}" for n in SYSTEMS), "kl_shallow", "kl_narrow", "kl_int4"):
        torch.testing.assert_close(shared_stats[key], plain_stats[key], rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in shared_grads.items():  # equal up to summation order: tolerance scaled to the tensor
        scale = float(plain_grads[name].abs().max())
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=name)
    # input layer: computed for 'full', reused by 'shallow' and 'narrow'; 'int4' quantizes
    # embed.out.0, so it runs its own. Block 0 of 'shallow' ([0, 2]) is the full model's block 0.
    assert (hits, misses) == (3, 12)


def test_one_system_model_trains_exactly_like_stock_espnet(asr_task, tmp_path):
    """Features computed once per step + the stock forward per system = ESPnet's own loss."""
    enc = {k: v for k, v in ENC.items() if k != "quant_conf"}
    stock = build(asr_task, tmp_path, encoder="elastic_conformer", enc=enc, systems=None, decoder_quant=None)
    single = build(asr_task, tmp_path, encoder="elastic_conformer", enc=enc, systems={"only": {}},
                   decoder_quant=None)
    single.load_state_dict(stock.state_dict())
    for model in (stock, single):
        model.train()
    loss_stock, _, _ = stock(**batch())
    loss_single, stats, _ = single(**batch())
    torch.testing.assert_close(loss_single, loss_stock)
    torch.testing.assert_close(stats["loss_only"], loss_stock.detach())


def test_every_system_sees_one_augmented_normalised_batch_without_frontend(asr_task, tmp_path):
    """Regression: with extracted features (no front end) SpecAugment and GlobalMVN work in
    place; each system must still see the batch augmented and normalised once."""
    from espnet2.asr.specaug.specaug import SpecAug
    from espnet2.layers.utterance_mvn import UtteranceMVN

    model = build(asr_task, tmp_path, systems={"full": {}, "same": {"blocks": [0, 1, 2]}},
                  share_computation=False)  # 'same' recomputes the encoder on what it is given
    model.specaug = SpecAug(apply_time_warp=False, freq_mask_width_range=(0, 4), num_freq_mask=1,
                            time_mask_width_range=(0, 5), num_time_mask=1)
    model.normalize = UtteranceMVN()
    model.train()
    loss, stats, _ = model(**batch())
    loss.backward()  # would fail if a tensor saved by one system were changed in place by the next
    torch.testing.assert_close(stats["loss_same"], stats["loss_full"])
    assert float(stats["kl_same"]) == pytest.approx(0.0, abs=1e-6)
    assert model.specaug is not None and model.normalize is not None  # restored after the step


def test_nested_conformer_is_the_supernet_without_quant_options(asr_task, tmp_path):
    """``nested_conformer``: full precision by default, any supported width per system."""
    enc = {k: v for k, v in ENC.items() if k != "quant_conf"}
    systems = {"full": {}, "int2": {"bits": 2}, "mixed": {"bits": {"encoders.0.*": 8, "*": 3}, "blocks": [0, 2]}}
    model = build(asr_task, tmp_path, encoder="nested_conformer", enc=enc, systems=systems, decoder_quant=None)
    assert all(m.bits == 0 for m in model.encoder.quantizable_modules().values())  # the largest is fp
    with model.system("mixed"):
        bits = {n: m.bits for n, m in model.encoder.quantizable_modules().items()}
    assert bits["encoders.0.feed_forward.w_1"] == 8 and bits["encoders.2.feed_forward.w_1"] == 3
    with pytest.raises(SystemSpecError, match="unsupported bit width 7"):
        build(asr_task, tmp_path, encoder="nested_conformer", enc=enc, systems={"a": {"bits": 7}}, decoder_quant=None)


def _drawn(stats):
    return sorted(n for n in SYSTEMS if stats[f"loss_{n}"] is not None)


def test_sampled_sequence_continues_after_resume(asr_task, tmp_path):
    """The step counter is stored with the model, so ``--resume`` continues the draws."""
    straight = build(asr_task, tmp_path, sampling="random", num_random_systems=1, sampling_seed=5)
    straight.train()
    draws = [_drawn(straight(**batch())[1]) for _ in range(6)]
    first = build(asr_task, tmp_path, sampling="random", num_random_systems=1, sampling_seed=5)
    first.train()
    for _ in range(3):
        first(**batch())
    state = first.state_dict()
    assert int(state["num_steps"]) == 3
    resumed = build(asr_task, tmp_path, sampling="random", num_random_systems=1, sampling_seed=5)
    resumed.load_state_dict(state, strict=True)
    resumed.train()
    assert [_drawn(resumed(**batch())[1]) for _ in range(3)] == draws[3:]


def test_ctc_kl_compares_the_final_layers_posteriors_with_intermediate_ctc(asr_task, tmp_path, monkeypatch):
    enc = dict(ENC, interctc_layer_idx=[1])
    model = build(asr_task, tmp_path, enc=enc, interctc_weight=0.3, kl_target="ctc",
                  systems={"full": {}, "shallow": {"blocks": [0, 2]}})
    seen = []
    kl = model._kl
    monkeypatch.setattr(model, "_kl", lambda t, s, lens: seen.append(s["ctc_logits"].detach()) or kl(t, s, lens))
    model.train()
    model(**batch())
    b = batch()
    with torch.no_grad(), model.system("shallow"):
        (final, _), _ = model.encode(b["speech"], b["speech_lengths"])
        torch.testing.assert_close(seen[0], model.ctc.ctc_lo(final))


def test_students_draw_their_own_encoder_dropout_masks(asr_task, tmp_path):
    """The decoder replays the teacher's dropout masks on a fork of the RNG: two students with the
    same plan still draw different encoder masks (they used to draw identical ones)."""
    enc = dict(ENC, dropout_rate=0.3)
    model = build(asr_task, tmp_path, enc=enc, share_computation=False,
                  systems={"full": {}, "a": {"blocks": [0, 2]}, "b": {"blocks": [0, 2]}})
    model.train()
    _, stats, _ = model(**batch())
    assert float(stats["loss_a"]) != float(stats["loss_b"])


def test_checkpoint_selection_over_all_systems_is_reported_in_validation(asr_task, tmp_path):
    model = build(asr_task, tmp_path)
    model.eval()
    with torch.no_grad():
        _, stats, _ = model(**batch())
    accs = [float(stats[f"acc_{n}"]) for n in SYSTEMS]
    assert float(stats["acc_mean"]) == pytest.approx(sum(accs) / len(accs))
    assert float(stats["acc_worst"]) == pytest.approx(min(accs))


def test_the_active_system_is_logged_at_build(asr_task, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("ESPNET_COMPRESS_SYSTEM", "shallow")
    with caplog.at_level("INFO", logger="espnet_compress.models.multi_system"):
        build(asr_task, tmp_path)
    assert "active system 'shallow'" in caplog.text and "'blocks': [0, 2]" in caplog.text
