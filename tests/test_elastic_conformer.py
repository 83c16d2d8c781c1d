"""The elastic core: default plan == ESPnet's ConformerEncoder; plans skip, repeat and narrow."""
from __future__ import annotations

import copy

import pytest
import torch
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_compress.core.plan import ExecutionPlan, PlanError
from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder
from tests.conftest import tiny_conformer_options

IDIM = 20


def _pair(**overrides):
    torch.manual_seed(0)
    stock = ConformerEncoder(IDIM, **tiny_conformer_options(**overrides)).eval()
    elastic = ElasticConformerEncoder(IDIM, **tiny_conformer_options(**overrides)).eval()
    missing = elastic.load_state_dict(stock.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return stock, elastic


def _inputs():
    torch.manual_seed(1)
    return torch.randn(3, 64, IDIM), torch.tensor([64, 50, 33])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"macaron_style": False, "use_cnn_module": False},
        {"rel_pos_type": "legacy", "pos_enc_layer_type": "rel_pos", "selfattention_layer_type": "rel_selfattn"},
        {"interctc_layer_idx": [1, 2]},
        {"input_layer": "linear", "normalize_before": False},
    ],
)
def test_default_plan_equals_stock_conformer(overrides):
    stock, elastic = _pair(**overrides)
    x, lens = _inputs()
    out_s, len_s, _ = stock(x, lens)
    out_e, len_e, _ = elastic(x, lens)
    if isinstance(out_s, tuple):  # intermediate CTC outputs
        assert [i for i, _ in out_s[1]] == [i for i, _ in out_e[1]]
        for (_, a), (_, b) in zip(out_s[1], out_e[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        out_s, out_e = out_s[0], out_e[0]
    torch.testing.assert_close(out_s, out_e, rtol=0, atol=0)
    assert torch.equal(len_s, len_e)


def test_parameter_names_match_stock():
    stock, elastic = _pair()
    assert list(stock.state_dict()) == list(elastic.state_dict())


def test_stock_checkpoint_file_loads(tmp_path):
    stock, _ = _pair()
    ckpt = tmp_path / "stock.pth"
    torch.save(stock.state_dict(), ckpt)
    fresh = ElasticConformerEncoder(IDIM, **tiny_conformer_options()).eval()
    fresh.load_state_dict(torch.load(ckpt, map_location="cpu"), strict=True)
    x, lens = _inputs()
    torch.testing.assert_close(fresh(x, lens)[0], stock(x, lens)[0], rtol=0, atol=0)


def _explicit_small_model(elastic: ElasticConformerEncoder, blocks, units: int) -> ConformerEncoder:
    """A stock Conformer with len(blocks) blocks of FFN width ``units``, weights copied by hand."""
    small = ConformerEncoder(IDIM, **tiny_conformer_options(num_blocks=len(blocks), linear_units=units)).eval()
    src = elastic.state_dict()
    dst = small.state_dict()
    for key in dst:
        if key.startswith("encoders."):
            _, step, rest = key.split(".", 2)
            value = src[f"encoders.{blocks[int(step)]}.{rest}"]
            if ".w_1." in rest:
                value = value[:units]
            elif rest.endswith("w_2.weight"):
                value = value[:, :units]
            dst[key] = value.clone()
        else:
            dst[key] = src[key].clone()
    small.load_state_dict(dst)
    return small


@pytest.mark.parametrize("blocks,units", [((0, 2), 48), ((1,), 16), ((0, 0, 2, 2), 24), ((2, 1, 0), 8)])
def test_plan_equals_explicit_model(blocks, units):
    _, elastic = _pair()
    x, lens = _inputs()
    small = _explicit_small_model(elastic, blocks, units)
    with elastic.using({"blocks": list(blocks), "ffn_units": units}):
        got = elastic(x, lens)[0]
    torch.testing.assert_close(got, small(x, lens)[0], rtol=1e-5, atol=1e-6)


def test_using_restores_previous_plan_and_params_do_not_depend_on_plan():
    _, elastic = _pair()
    n = elastic.physical_parameters()
    with elastic.using({"blocks": [0, 0, 0, 1, 1, 1]}):
        assert elastic.plan.depth == 6
        assert elastic.physical_parameters() == n
    assert elastic.plan == elastic.default_plan


def test_repeated_block_accumulates_gradient():
    _, elastic = _pair()
    elastic.train()
    x, lens = _inputs()
    elastic.set_plan({"blocks": [1, 1]})
    elastic(x, lens)[0].sum().backward()
    assert elastic.encoders[1].feed_forward.w_1.weight.grad.abs().sum() > 0
    assert elastic.encoders[0].feed_forward.w_1.weight.grad is None


def test_narrow_ffn_gets_no_gradient_on_masked_units():
    _, elastic = _pair()
    x, lens = _inputs()
    elastic.set_plan({"ffn_units": 16})
    elastic(x, lens)[0].sum().backward()
    g = elastic.encoders[0].feed_forward.w_1.weight.grad
    assert g[:16].abs().sum() > 0 and torch.all(g[16:] == 0)


@pytest.mark.parametrize(
    "plan,needle",
    [
        ({"blocks": [0, 3]}, "names block 3"),
        ({"blocks": []}, "blocks is empty"),
        ({"ffn_units": 49}, "ffn_units 49 is outside 1..48"),
        ({"blocks": [0, 1], "ffn_units": [8, 8, 8]}, "ffn_units has 3 entries"),
        ({"bits": 4}, "no quantized weights"),
        ({"block": [0]}, "unknown field(s) ['block']"),
        ({"blocks": ["a"]}, "must contain integers"),
    ],
)
def test_bad_plans_are_rejected_with_named_field(plan, needle):
    with pytest.raises(PlanError) as err:
        ElasticConformerEncoder(IDIM, plan=plan, **tiny_conformer_options())
    assert needle in str(err.value)


def test_unknown_encoder_option_rejected():
    with pytest.raises(TypeError, match=r"unknown encoder_conf option\(s\) \['num_block'\]"):
        ElasticConformerEncoder(IDIM, num_block=2)


def test_plan_round_trips_through_config():
    plan = ExecutionPlan.from_config({"blocks": [0, 2], "ffn_units": [8, 16], "bits": {"*.w_1": 4, "*": 8}}, 3)
    assert ExecutionPlan.from_config(plan.to_config(), 3) == plan
    assert plan.bits_for("encoders.0.feed_forward.w_1") == 4
    assert plan.bits_for("encoders.0.self_attn.linear_q") == 8


def test_deepcopy_and_default_plan_in_config():
    elastic = ElasticConformerEncoder(IDIM, plan={"blocks": [0, 1]}, **tiny_conformer_options())
    assert elastic.plan.blocks == (0, 1)
    clone = copy.deepcopy(elastic)
    assert clone.plan == elastic.plan


def test_train_mode_equals_stock_conformer_with_dropout():
    """Equivalence holds in training too: same dropout draws in the same order (same seed)."""
    drop = dict(dropout_rate=0.2, positional_dropout_rate=0.1, attention_dropout_rate=0.1)
    stock, elastic = _pair(**drop)
    stock.train(), elastic.train()
    x, lens = _inputs()
    torch.manual_seed(7)
    out_s = stock(x, lens)[0]
    torch.manual_seed(7)
    out_e = elastic(x, lens)[0]
    torch.testing.assert_close(out_s, out_e, rtol=0, atol=0)


def test_layer_drop_rate_is_refused_because_the_stock_conformer_ignores_it():
    """ESPnet's ConformerEncoder accepts layer_drop_rate but never applies it: a twin that did
    would train differently from the stock baseline."""
    stock = ConformerEncoder(IDIM, **tiny_conformer_options(layer_drop_rate=0.5)).train()
    x, lens = _inputs()
    torch.manual_seed(0)
    first = stock(x, lens)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(stock(x, lens)[0], first)  # no layer was dropped, whatever the draws
    with pytest.raises(ValueError, match=r"encoder_conf.layer_drop_rate: 0.5 is not supported: ESPnet's "
                                         r"ConformerEncoder accepts it but never applies it"):
        ElasticConformerEncoder(IDIM, **tiny_conformer_options(layer_drop_rate=0.5))
