"""DARTS search over FFN widths and low-rank bottlenecks (``encoder_conf.search``): the mixture, the
penalty, the pipelined stages, the semi-orthogonal update, derivation and export, bad input."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import yaml

from espnet_compress.core.lowrank import (
    LowRankLinear,
    semi_orthogonal_init_,
    semi_orthogonal_step_,
    semi_orthogonality_error,
    svd_factors,
)
from espnet_compress.core.plan import PlanError
from espnet_compress.encoders.aliases import SearchableConformerEncoder
from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder
from espnet_compress.export.search_export import derive_search, warm_start_search
from espnet_compress.features.search import HELD_OUT_MARKER, SearchConfigError, search_feature
from espnet_compress.models.systems import SystemSpecError
from espnet_compress.pipeline.search import split_held_out
from tests.conftest import benchmark, tiny_conformer_options
from tests.test_nested import batch
from tests.test_registration import _build_args

#: d 32, FFN 48, 3 blocks; input 20-dim features
ENC = tiny_conformer_options()
WIDTHS = {"widths": [16, 32, 48]}
RANKS = {"ranks": [4, 8, 16]}
BOTH = {**WIDTHS, **RANKS}
ARCH_FROZEN_PREFIXES = ("encoder.embed", "encoder.encoders", "encoder.after_norm", "decoder", "ctc")


def encoder(search: Dict[str, Any], **enc: Any) -> ElasticConformerEncoder:
    torch.manual_seed(0)
    return ElasticConformerEncoder(20, **{**ENC, **enc}, search=search)


def randomise_alpha(feature, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in feature.arch.alpha.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 2)


def model(asr_task, tmp: Path, search: Dict[str, Any], encoder_name: str = "elastic_conformer",
          model_name: str = "compressed", **model_conf: Any):
    args = _build_args(asr_task, tmp, {**ENC, "search": search})
    args.encoder, args.model, args.model_conf = encoder_name, model_name, {"ctc_weight": 0.3, **model_conf}
    torch.manual_seed(0)
    return asr_task.ASRTask.build_model(args), args


def freeze(net: torch.nn.Module, prefixes) -> None:
    """ESPnet's --freeze_param."""
    for name, p in net.named_parameters():
        if any(name == t or name.startswith(t + ".") for t in prefixes):
            p.requires_grad = False


def held_out_dir(tmp: Path) -> Path:
    d = tmp / "heldout"
    d.mkdir(exist_ok=True)
    (d / HELD_OUT_MARKER).write_text("{}\n")
    return d


def x_and_lengths():
    torch.manual_seed(3)
    return torch.randn(2, 40, 20), torch.tensor([40, 31])


# ------------------------------------------------------------------ the mixture
@pytest.mark.parametrize("method", ["gumbel", "softmax"])
def test_architecture_weights_sum_to_one_and_masks_are_nested(method):
    search = dict(BOTH, method=method) if method == "softmax" else dict(BOTH)
    feature = search_feature(encoder(search))
    randomise_alpha(feature)
    for key in feature.choices:
        for kind in ("width", "rank"):
            assert torch.isclose(feature.probabilities(key, kind).sum(), torch.tensor(1.0))
            for training in (True, False):
                lam = feature._weights(key, kind, training)
                assert torch.isclose(lam.sum(), torch.tensor(1.0)) and (lam >= 0).all()
        for mask in feature.masks(key, training=True):
            assert float(mask[0].detach()) == pytest.approx(1.0)  # every candidate keeps the first unit
            assert (mask[1:] <= mask[:-1] + 1e-6).all()  # unit j: weight of the candidates wider than j


def test_width_mixture_is_the_weighted_sum_of_the_candidate_ffns():
    """Eq. (2) exactly, at the cost of one FFN: sum_i lambda_i FFN_{w_i}(x) computed by slicing."""
    enc = encoder(dict(WIDTHS, method="softmax")).eval()
    feature = search_feature(enc)
    randomise_alpha(feature)
    ffn = enc.encoders[1].feed_forward
    x = torch.randn(5, 32)
    lam = feature.probabilities("b1_ff", "width")
    expected = sum(l * (torch.nn.functional.linear(ffn.activation(torch.nn.functional.linear(
        x, ffn.w_1.weight[:w], ffn.w_1.bias[:w])), ffn.w_2.weight[:, :w], ffn.w_2.bias))
        for l, w in zip(lam, feature.choices["b1_ff"].widths))
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("search", [WIDTHS, RANKS, BOTH], ids=["width", "rank", "both"])
def test_one_hot_mixture_equals_the_derived_model(search):
    """The supernet with one-hot weights at a pick computes what the derived model (each FFN built
    at its picked width/bottleneck, weights cut from the supernet) computes."""
    sup = encoder(dict(search)).eval()
    feature = search_feature(sup)
    randomise_alpha(feature)
    pick = feature.pick()
    derived = encoder({"fixed": feature.architecture(pick)}).eval()
    derived.load_state_dict(feature.derived_state(sup.state_dict(), sup, pick, prefix=""), strict=True)
    x, lengths = x_and_lengths()
    with torch.no_grad(), feature.pinned(pick):
        want = sup(x, lengths)[0]
    torch.testing.assert_close(derived(x, lengths)[0], want, rtol=1e-5, atol=1e-5)
    sizes = feature.sizes(pick)
    assert len({w for w, _ in sizes.values()}) > 1 or search is RANKS  # random alpha picks differ per FFN
    # the derived model holds only the picked sizes
    ffn = derived.encoders[0].feed_forward_macaron
    w, r = sizes["b0_ffm"]
    assert ffn.full_units == w and (r is None or ffn.w_1.rank == r)
    assert sum(p.numel() for p in derived.parameters()) < sum(
        p.numel() for n, p in sup.named_parameters() if not n.startswith("architecture."))


def test_eval_drops_the_noise_and_training_samples_it():
    feature = search_feature(encoder(dict(WIDTHS)))
    randomise_alpha(feature)
    a = feature._weights("b0_ff", "width", training=False)
    torch.testing.assert_close(a, torch.softmax(feature.arch.alpha["b0_ff_width"] / feature.temperature_now(), 0))
    torch.manual_seed(0)
    b = feature._weights("b0_ff", "width", training=True)
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------ penalty and stages
def test_penalty_gradient_reaches_alpha_and_only_alpha_in_stage_2(asr_task, tmp_path):
    search = dict(BOTH, eta=5.0, stage="arch", held_out=str(held_out_dir(tmp_path)))
    net, _ = model(asr_task, tmp_path, search)
    freeze(net, ARCH_FROZEN_PREFIXES)
    feature = search_feature(net.encoder)
    # the penalty alone: d/d alpha_i of eta E[C] = eta p_i (C_i - E[C]): narrow candidates gain
    penalty = feature.penalty()
    penalty.backward()
    g = feature.arch.alpha["b0_ff_width"].grad
    assert g is not None and g[0] < 0 < g[-1]  # descent raises the narrowest's logit, lowers the widest's
    net.zero_grad()
    net.train()
    loss, stats, _ = net(**batch())
    loss.backward()
    for name, p in net.named_parameters():
        if name.startswith("encoder.architecture."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert float(stats["search_penalty"]) == pytest.approx(float(penalty), rel=1e-5)
    assert float(loss) == pytest.approx(float(stats["loss"]) + float(penalty), rel=1e-5)
    assert int(feature.arch.arch_steps) == 1  # stage-2 steps drive the temperature


def test_a_stage_2_search_is_reproducible_from_its_seed(asr_task, tmp_path):
    """The Gumbel noise comes from torch's generator, which asr_train seeds (``seed``): the same seed
    gives the same alpha after several stage-2 steps, another seed different ones."""
    search = dict(WIDTHS, eta=1.0, stage="arch", held_out=str(held_out_dir(tmp_path)))

    def alpha_after_steps(seed: int) -> torch.Tensor:
        net, _ = model(asr_task, tmp_path, search)
        freeze(net, ARCH_FROZEN_PREFIXES)
        # SGD: Adam's first steps are +-lr whatever the noise, which would hide it
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
        net.train()
        data = batch()  # (it seeds torch's generator itself)
        torch.manual_seed(seed)
        for _ in range(3):
            opt.zero_grad()
            net(**data)[0].backward()
            opt.step()
        return torch.cat([p.detach().clone() for p in search_feature(net.encoder).arch.alpha.values()])

    first = alpha_after_steps(7)
    assert torch.equal(first, alpha_after_steps(7))
    assert not torch.equal(first, alpha_after_steps(8))


def test_stats_show_alpha_temperature_and_pick(asr_task, tmp_path):
    net, _ = model(asr_task, tmp_path, dict(WIDTHS, eta=1.0))
    net.eval()
    with torch.no_grad():
        _, stats, _ = net(**batch())
    assert {"search_penalty", "search_temperature", "search_ffn_params_expected", "search_ffn_params_pick",
            "search_b0_ffm_width", "alpha_b0_ffm_w16", "alpha_b2_ff_w48"} <= set(stats)
    probs = sum(float(stats[f"alpha_b1_ff_w{w}"]) for w in (16, 32, 48))
    assert probs == pytest.approx(1.0)
    assert all(v.numel() == 1 for v in stats.values())  # ESPnet's reporter takes scalars


def test_temperature_anneals_over_stage_2_steps():
    feature = search_feature(encoder(dict(WIDTHS, temperature={"initial": 2.0, "final": 0.5, "anneal_steps": 10})))
    assert feature.temperature_now() == pytest.approx(2.0)
    feature.arch.arch_steps.fill_(5)
    assert feature.temperature_now() == pytest.approx(1.0)
    feature.arch.arch_steps.fill_(50)
    assert feature.temperature_now() == pytest.approx(0.5)


def test_target_ratio_penalises_only_the_size_above_the_target():
    feature = search_feature(encoder(dict(WIDTHS, eta=1.0, target_ratio=0.9)))
    assert float(feature.penalty()) == 0.0  # uniform alpha: expected size 2/3 of the largest
    feature = search_feature(encoder(dict(WIDTHS, eta=1.0, target_ratio=0.5)))
    assert float(feature.penalty()) > 0.0


@pytest.mark.parametrize("case,needle", [
    ("arch_unfrozen", "encoder_conf.search.stage: arch (stage 2) updates only alpha"),
    ("weights_alpha_trains", "encoder_conf.search.stage: weights (stage 1)"),
    ("no_marker", "encoder_conf.search.held_out"),
])
def test_pipelined_stages_are_checked_on_the_first_training_step(asr_task, tmp_path, case, needle):
    if case == "weights_alpha_trains":
        net, _ = model(asr_task, tmp_path, dict(WIDTHS))
    else:
        held = held_out_dir(tmp_path) if case == "arch_unfrozen" else tmp_path / "not_a_split"
        net, _ = model(asr_task, tmp_path, dict(WIDTHS, stage="arch", held_out=str(held)))
        if case == "no_marker":
            freeze(net, ARCH_FROZEN_PREFIXES)
    net.train()
    with pytest.raises(SearchConfigError, match=re.escape(needle)):
        net(**batch())


def test_a_model_that_drops_the_penalty_is_refused(asr_task, tmp_path):
    net, _ = model(asr_task, tmp_path, dict(WIDTHS), model_name="espnet")
    freeze(net, ["encoder.architecture"])
    net.train()
    net(**batch())
    with pytest.raises(RuntimeError, match="needs 'model: compressed'"):
        net(**batch())


# ------------------------------------------------------------------ semi-orthogonal factors
def test_semi_orthogonal_update_keeps_b_bt_close_to_identity():
    torch.manual_seed(0)
    for shape in ((16, 48), (48, 16)):  # wide (B, projection) and tall (A, affine part)
        w = semi_orthogonal_init_(torch.empty(shape))
        assert semi_orthogonality_error(w) < 1e-4
        w += 0.05 * torch.randn(shape)  # SGD moved it off the constraint
        start = semi_orthogonality_error(w)
        for _ in range(8):
            semi_orthogonal_step_(w)
        assert semi_orthogonality_error(w) < 1e-4 < start
        for _ in range(50):  # interleaved with updates, it stays near the constraint
            w += 0.002 * torch.randn(shape)
            semi_orthogonal_step_(w)
        assert semi_orthogonality_error(w) < 0.02


def test_slls_factors_are_constrained_during_training():
    enc = encoder(dict(RANKS, orthogonal_every=1)).train()
    feature = search_feature(enc)
    ffn = enc.encoders[0].feed_forward
    assert isinstance(ffn.w_1, LowRankLinear)
    constrained = {id(p) for p in feature.constrained_factors(enc)}
    assert id(ffn.w_1.proj.weight) in constrained and id(ffn.w_2.affine.weight) in constrained  # S..S
    assert id(ffn.w_1.affine.weight) not in constrained and id(ffn.w_2.proj.weight) not in constrained  # .LL.
    with torch.no_grad():
        ffn.w_1.proj.weight.add_(0.05 * torch.randn_like(ffn.w_1.proj.weight))
    before = semi_orthogonality_error(ffn.w_1.proj.weight)
    x, lengths = x_and_lengths()
    for _ in range(4):
        enc(x, lengths)
        feature._pending = False  # the model would add the penalty here
    assert semi_orthogonality_error(ffn.w_1.proj.weight) < before / 10


# ------------------------------------------------------------------ derive and export
def _save(net, args, tmp: Path) -> Path:
    (tmp / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(net.state_dict(), tmp / "model.pth")
    return tmp / "config.yaml"


@pytest.mark.parametrize("search", [WIDTHS, BOTH], ids=["width", "both"])
def test_exported_derived_model_equals_the_supernet_under_its_pick(asr_task, tmp_path, search):
    from espnet2.tasks.asr import ASRTask

    net, args = model(asr_task, tmp_path, dict(search, eta=1.0))
    feature = search_feature(net.encoder)
    randomise_alpha(feature)
    config = _save(net, args, tmp_path)
    out = derive_search(config, tmp_path / "model.pth", tmp_path / "derived")
    assert out.max_abs_diff < 1e-5 and not out.stock
    derived, _ = ASRTask.build_model_from_file(out.config, out.model_file, "cpu")
    conf = yaml.safe_load(out.config.read_text())
    assert conf["encoder"] == "elastic_conformer" and "freeze_param" not in conf
    assert set(conf["encoder_conf"]["search"]) >= {"fixed"} and "eta" not in conf["encoder_conf"]["search"]
    net.eval()
    derived.eval()
    b = batch()
    with torch.no_grad(), feature.pinned(feature.pick()):
        want = net(**b)
    got = derived(**b)
    torch.testing.assert_close(got[0], want[0] - want[1]["search_penalty"], rtol=1e-5, atol=1e-5)
    assert out.num_params < out.supernet_params
    assert json.loads((tmp_path / "derived" / "derive.json").read_text())["architecture"] == out.architecture


# ------------------------------------------------------------------ warm start from a dense model
@pytest.mark.parametrize("constrained", [(True, False), (False, True), (False, False)], ids=["proj", "affine", "none"])
def test_svd_factors_nest_best_approximations_and_start_on_the_constraint(constrained):
    """Every bottleneck prefix of the SVD warm start is the best approximation of its rank (its error
    is the energy of the dropped singular values), and the constrained factor is semi-orthogonal."""
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(weight.double())
    proj, affine = svd_factors(weight, 32, constrained)
    torch.testing.assert_close(affine @ proj, weight, rtol=1e-5, atol=1e-5)  # full rank: the dense layer
    for k in (4, 16):
        err = torch.linalg.matrix_norm((affine[:, :k] @ proj[:k]).double() - weight.double())
        assert float(err) == pytest.approx(float(s[k:].pow(2).sum().sqrt()), rel=1e-4)
    for is_constrained, factor_weight in zip(constrained, (proj, affine)):
        if is_constrained:
            assert semi_orthogonality_error(factor_weight) < 1e-4
            assert semi_orthogonality_error(factor_weight[:8] if factor_weight is proj else factor_weight[:, :8]) < 1e-4
    with pytest.raises(ValueError, match="rank 33 must be in 1..32"):
        svd_factors(weight, 33, constrained)


def _dense_and_search_configs(asr_task, tmp: Path, search: Dict[str, Any], **enc: Any):
    """A trained-looking dense stock Conformer (config + checkpoint) and a stage-1 search config."""
    args = _build_args(asr_task, tmp, dict(ENC))
    args.encoder, args.model, args.model_conf = "conformer", "espnet", {"ctc_weight": 0.3}
    torch.manual_seed(5)
    dense = asr_task.ASRTask.build_model(args).eval()
    config = _save(dense, args, tmp)
    search_config = tmp / "stage1.yaml"
    search_config.write_text(yaml.safe_dump({
        "encoder": "elastic_conformer", "encoder_conf": {**ENC, **enc, "search": dict(search, stage="weights")},
        "model": "compressed", "model_conf": {"ctc_weight": 0.3}, "freeze_param": ["encoder.architecture"],
        "init": "none"}))  # a recipe YAML, not yet parsed by asr_train
    return dense, config, search_config


def test_warm_start_puts_the_dense_model_into_the_supernet(asr_task, tmp_path):
    """At its largest candidates (full width, full-rank bottleneck) the warm-started supernet computes
    what the dense model computes; a smaller bottleneck is the truncated SVD of the dense weight, with
    the SLLS factors semi-orthogonal."""
    from espnet2.tasks.asr import ASRTask

    dense, config, search_config = _dense_and_search_configs(asr_task, tmp_path, {"widths": [32, 48], "ranks": [8, 32]})
    out = warm_start_search(config, tmp_path / "model.pth", search_config, tmp_path / "warm.pth")
    network = {k: v for k, v in yaml.safe_load(search_config.read_text()).items() if k.startswith(("encoder", "model"))}
    conf = {**yaml.safe_load(config.read_text()), **network}
    sup = ASRTask.build_model(argparse.Namespace(**conf)).eval()
    missing, unexpected = sup.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert not unexpected and all(k.startswith("encoder.architecture.") for k in missing) and missing
    feature = search_feature(sup.encoder)
    largest = {k: {"width": 1, "rank": 1} for k in feature.choices}
    x, lengths = x_and_lengths()
    with torch.no_grad(), feature.pinned(largest):
        got = sup.encode(x, lengths)[0]
    torch.testing.assert_close(got, dense.encode(x, lengths)[0], rtol=1e-4, atol=1e-4)
    ffn, dense_ffn = sup.encoder.encoders[2].feed_forward, dense.encoder.encoders[2].feed_forward
    k = 8
    u, s, vh = torch.linalg.svd(dense_ffn.w_1.weight.detach().double())
    truncated = (u[:, :k] * s[:k]) @ vh[:k]
    torch.testing.assert_close((ffn.w_1.affine.weight[:, :k] @ ffn.w_1.proj.weight[:k]).double(), truncated,
                               rtol=1e-4, atol=1e-5)
    assert semi_orthogonality_error(ffn.w_1.proj.weight) < 1e-4  # S...: first layer's projection
    assert semi_orthogonality_error(ffn.w_2.affine.weight) < 1e-4  # ...S: second layer's affine part
    # ESPnet's checkpoint.pth (model state beside the optimiser's) warm-starts the same supernet
    torch.save({"model": dense.state_dict(), "optimizers": [{}]}, tmp_path / "checkpoint.pth")
    again = torch.load(warm_start_search(config, tmp_path / "checkpoint.pth", search_config, tmp_path / "w2.pth"))
    first = torch.load(out)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_warm_start_refuses_a_dense_model_of_another_shape_and_writes_nothing(asr_task, tmp_path):
    _, config, search_config = _dense_and_search_configs(asr_task, tmp_path, {"ranks": [8, 16]}, linear_units=64)
    with pytest.raises(ValueError, match=r"encoders\.0\.feed_forward\.w_1\.weight: shape \(48, 32\).*64x32"):
        warm_start_search(config, tmp_path / "model.pth", search_config, tmp_path / "warm.pth")
    assert not (tmp_path / "warm.pth").exists()


def test_warm_start_cli_names_a_missing_file_and_a_misfit(asr_task, tmp_path, capsys):
    from espnet_compress.bin.warm_start_search import main

    _, config, search_config = _dense_and_search_configs(asr_task, tmp_path, {"ranks": [8, 16]}, linear_units=64)
    common = ["--dense_config", str(config), "--search_config", str(search_config), "--out", str(tmp_path / "w.pth")]
    assert main([*common, "--dense_model", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err
    assert main([*common, "--dense_model", str(tmp_path / "model.pth")]) == 2
    assert "linear_units 64" in capsys.readouterr().err and not (tmp_path / "w.pth").exists()


def test_a_uniform_answer_exports_as_a_stock_conformer(asr_task, tmp_path):
    from espnet2.tasks.asr import ASRTask

    net, args = model(asr_task, tmp_path, dict(WIDTHS), encoder_name="searchable_conformer")
    feature = search_feature(net.encoder)
    with torch.no_grad():
        for p in feature.arch.alpha.values():
            p.copy_(torch.tensor([0.0, 3.0, 0.0]))  # every FFN picks 32
    config = _save(net, args, tmp_path)
    out = derive_search(config, tmp_path / "model.pth", tmp_path / "derived")
    conf = yaml.safe_load(out.config.read_text())
    assert out.stock and conf["encoder"] == "conformer" and conf["model"] == "espnet"
    assert conf["encoder_conf"]["linear_units"] == 32 and "search" not in conf["encoder_conf"]
    stock, _ = ASRTask.build_model_from_file(out.config, out.model_file, "cpu")
    assert type(stock.encoder).__name__ == "ConformerEncoder" and out.max_abs_diff < 1e-5


def test_a_derived_architecture_quantizes_and_packs(asr_task, tmp_path):
    """The paper's order, searched architecture -> QAT -> packed file: ``quant_conf`` on a derived
    (``fixed``) model puts quantizers on the rebuilt FFN layers, low-rank factors included, with the
    bits of its per-module rules, and the packed file computes what the QAT model computed."""
    from espnet2.tasks.asr import ASRTask

    from espnet_compress.export.packed_export import export_packed
    from espnet_compress.quant.api import quantized_modules

    net, args = model(asr_task, tmp_path, dict(BOTH, eta=1.0))
    randomise_alpha(search_feature(net.encoder))
    out = derive_search(_save(net, args, tmp_path), tmp_path / "model.pth", tmp_path / "derived")
    assert not out.stock
    conf = yaml.safe_load(out.config.read_text())
    conf["encoder_conf"]["quant_conf"] = {"bits": {"encoders.*.feed_forward.*": 2, "*": 4}}
    qat_dir = tmp_path / "qat"
    qat_dir.mkdir()
    (qat_dir / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    qat, _ = ASRTask.build_model_from_file(qat_dir / "config.yaml", out.model_file, "cpu")
    quantized = quantized_modules(qat.encoder)
    derived = search_feature(qat.encoder).fixed
    for b, (width, rank) in enumerate(zip(derived["width"]["feed_forward"], derived["rank"]["feed_forward"])):
        ffn = qat.encoder.encoders[b].feed_forward
        assert ffn.w_1.affine.out_features == width and ffn.w_1.proj.out_features == rank
        for layer in ("w_1.proj", "w_1.affine", "w_2.proj", "w_2.affine"):
            assert quantized[f"encoders.{b}.feed_forward.{layer}"].bits == 2
        assert quantized[f"encoders.{b}.feed_forward_macaron.w_1.proj"].bits == 4
    torch.save(qat.state_dict(), qat_dir / "model.pth")
    packed = export_packed(qat_dir / "config.yaml", qat_dir / "model.pth", qat_dir / "packed")
    histogram = packed.report["bits_histogram"]
    ffn_2bit = sum(m.weight.numel() for n, m in quantized.items() if ".feed_forward." in n)
    assert set(histogram) == {"2", "4"} and histogram["2"]["params"] == ffn_2bit
    loaded, _ = ASRTask.build_model_from_file(packed.config_file, packed.packed_file, "cpu")
    x, lengths = x_and_lengths()
    with torch.no_grad():
        want = qat.eval().encoder(x, lengths)[0]
        got = loaded.eval().encoder(x, lengths)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("search,needle", [
    ({"widths": [16, 64]}, "encoder_conf.search.widths: [64] above the physical FFN width"),
    ({"widths": [0, 16]}, "encoder_conf.search.widths: 0 is not a positive size"),
    ({"widths": [16, 32], "ranks": [8, 24]}, "encoder_conf.search.ranks: [24] larger than the layers"),
    ({"ranks": [8, 40]}, "encoder_conf.search.ranks: [40] larger than the layers"),
    ({"widths": [16], "temperature": {"initial": 1.0, "final": 1.0}}, "the schedule never anneals"),
    ({"widths": [16], "temperature": {"anneal_steps": 0}}, "encoder_conf.search.temperature.anneal_steps"),
    ({"widths": [16], "stage": "arch"}, "encoder_conf.search.held_out: stage 'arch' (stage 2)"),
    ({"widths": [16], "method": "softmax", "temperature": {"initial": 2.0}}, "only method 'gumbel'"),
    ({"widths": [16], "etaa": 1}, "encoder_conf.search: unknown option(s) ['etaa']"),
    ({"widths": [16], "target_ratio": 1.5}, "encoder_conf.search.target_ratio"),
    ({}, "nothing to search"),
    ({"fixed": {"width": {"feed_forward": [16, 16, 64]}}}, "encoder_conf.search.fixed.width.feed_forward: 64"),
    ({"fixed": {"rank": {"feed_forward": [4, 4, 40]}}}, "encoder_conf.search.fixed.rank.feed_forward: bottleneck 40"),
    ({"fixed": {"width": {"ffn": [16, 16, 16]}}}, "encoder_conf.search.fixed.width.ffn: no such FFN"),
    ({"fixed": {"width": {"feed_forward": [16]}}, "eta": 1.0}, "are search options"),
])
def test_bad_search_options_name_their_yaml_path(search, needle):
    with pytest.raises(SearchConfigError) as err:
        encoder(search)
    assert needle in str(err.value)


def test_search_does_not_combine_with_quantization_systems_or_plan_widths(asr_task, tmp_path):
    with pytest.raises(SearchConfigError, match="cannot be combined with encoder_conf.quant_conf"):
        encoder(dict(WIDTHS), quant_conf={"bits": 4})
    with pytest.raises(SystemSpecError, match="cannot be combined with encoder_conf.search"):
        model(asr_task, tmp_path, dict(WIDTHS), systems={"full": {}, "shallow": {"blocks": [0, 2]}})
    with pytest.raises(PlanError, match="ffn_units cannot be combined"):
        encoder(dict(WIDTHS), plan={"ffn_units": 32})


def test_searchable_alias_searches_eighths_of_linear_units_by_default():
    enc = SearchableConformerEncoder(20, **tiny_conformer_options(linear_units=64))
    assert search_feature(enc).widths == (16, 24, 32, 40, 48, 56, 64)
    enc = SearchableConformerEncoder(20, **tiny_conformer_options(), search={"ranks": [4]})
    assert search_feature(enc).widths is None  # the user's block decides what is searched


# ------------------------------------------------------------------ held-out split
def test_held_out_split_is_disjoint_reproducible_and_marked(tmp_path):
    from espnet_compress.corpus.kaldi_dir import write_kaldi_dir

    src = tmp_path / "data" / "train"
    utts = [(f"spk{i % 3}_u{i:02d}", f"spk{i % 3}", str(tmp_path / f"{i}.wav"), "yes") for i in range(20)]
    for _, _, wav, _ in utts:
        Path(wav).write_bytes(b"")
    write_kaldi_dir(src, utts)
    stats = tmp_path / "asr_stats"
    for split, ids in (("train", [u for u, *_ in utts]), ("valid", ["d1"])):
        (stats / split).mkdir(parents=True)
        (stats / split / "feats_stats.npz").write_bytes(b"npz")
        (stats / split / "speech_shape").write_text("".join(f"{u} 100\n" for u in ids))
    out = split_held_out(src, tmp_path / "split", stats, fraction=0.25, seed=3)
    sub = set((out.out_dir / out.train_sub / "text").read_text().split()[::2])
    held = set((out.held_out_dir / "text").read_text().split()[::2])
    assert len(held) == out.num_held_out == 5 and out.num_sub == 15 and not sub & held
    assert sub | held == {u for u, *_ in utts}
    assert (out.held_out_dir / HELD_OUT_MARKER).is_file()
    shapes = (out.stats_dir(out.held_out) / "train" / "speech_shape").read_text().split()[::2]
    assert set(shapes) == held and (out.stats_dir(out.train_sub) / "valid" / "speech_shape").is_file()
    assert split_held_out(src, tmp_path / "split", stats, fraction=0.25, seed=3) == out  # reused
    with pytest.raises(ValueError, match="was made with"):
        split_held_out(src, tmp_path / "split", stats, fraction=0.25, seed=4)


def test_derived_config_drops_the_run_and_takes_the_stage_1_schedule(asr_task, tmp_path):
    """A stage-2 run's config.yaml names its data, shapes and frozen parameters, and trains alpha with
    its own optimiser: the derived config keeps none of that (asr_train would append the search's
    data to the fine-tune's) and trains with the supernet's stage-1 schedule, found via init_param."""
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.yaml").write_text(yaml.safe_dump({"max_epoch": 7, "optim": "adam", "optim_conf": {"lr": 0.003}}))
    net, args = model(asr_task, tmp_path, dict(WIDTHS, method="softmax", temperature=None))
    args.init_param = [f"{stage1 / 'valid.acc.best.pth'}"]
    args.freeze_param = ["decoder"]
    args.train_data_path_and_name_and_type = [["heldout/wav.scp", "speech", "sound"]]
    args.max_epoch, args.optim_conf = 3, {"lr": 0.05}
    out = derive_search(_save(net, args, tmp_path), tmp_path / "model.pth", tmp_path / "derived")
    conf = yaml.safe_load(out.config.read_text())
    assert conf["max_epoch"] == 7 and conf["optim_conf"] == {"lr": 0.003}
    assert not {"init_param", "freeze_param", "train_data_path_and_name_and_type", "output_dir"} & set(conf)
    # asr_train takes it as --config (a run's dump also holds keys such as 'required' that it refuses)
    parsed = asr_task.ASRTask.get_parser().parse_args(["--config", str(out.config), "--output_dir", str(tmp_path)])
    assert parsed.encoder == conf["encoder"] == "conformer" and parsed.max_epoch == 7  # alpha 0: all 16


def test_darts_benchmark_refuses_a_fine_tune_without_epochs_before_writing(tmp_path, capsys):
    darts_search = benchmark("darts_search")

    with pytest.raises(SystemExit):
        darts_search.main(["--finetune_epochs", "0", "--exp_dir", str(tmp_path / "exp")])
    assert "--finetune_epochs must be a positive number of epochs, got 0" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()
