"""Foldable Conformer: unfolding paths, equivalence with explicit copies, joint training."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_compress.core.fold import FoldError, check_path, default_path, enumerate_paths
from espnet_compress.core.plan import PlanError
from espnet_compress.encoders.aliases import FoldableConformerEncoder
from espnet_compress.env import EnvVarError
from tests.conftest import tiny_conformer_options
from tests.test_nested import batch, build

IDIM = 20


def test_path_counts_match_the_paper():
    assert len(enumerate_paths(6, 8)) == 15           # C(6, 2)
    assert len(enumerate_paths(6, 12)) == 1           # every block twice
    assert len(enumerate_paths(4, 6)) == 6            # C(4, 2)
    assert len(enumerate_paths(8, 12, unfold_last=4)) == 1
    assert all(sorted(set(p)) == list(range(6)) for p in enumerate_paths(6, 8))
    assert len(set(enumerate_paths(6, 8))) == 15


def test_orders():
    assert default_path(3, 5) == (0, 1, 1, 2, 2)
    assert default_path(3, 5, order="cycle") == (0, 1, 2, 1, 2)
    assert default_path(2, 6, order="cycle") == (0, 1, 0, 1, 0, 1)
    assert default_path(8, 12, unfold_last=4) == (0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7)


@pytest.mark.parametrize(
    "path,kwargs,needle",
    [
        ((0, 1), {}, "depth 2 is below the 3 physical blocks"),
        ((0, 0, 0, 1, 2), {}, "breaks the unfolding rule: block 0 is used 3 times while block 1 is used 1"),
        ((0, 1, 3), {}, "path names block 3"),
        ((0, 0, 1, 2), {"unfold_last": 1}, "only the last 1 blocks may be unfolded"),
    ],
)
def test_bad_paths(path, kwargs, needle):
    with pytest.raises(FoldError) as err:
        check_path(path, 3, **kwargs)
    assert needle in str(err.value)


def _seed(**fold):
    torch.manual_seed(0)
    return FoldableConformerEncoder(IDIM, fold=fold, **tiny_conformer_options()).eval()


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 48, IDIM), torch.tensor([48, 40])


def _explicit(seed: FoldableConformerEncoder, path) -> ConformerEncoder:
    """A stock Conformer with one physical block per step, weights copied from the seed."""
    model = ConformerEncoder(IDIM, **tiny_conformer_options(num_blocks=len(path))).eval()
    src, dst = seed.state_dict(), model.state_dict()
    for key in dst:
        if key.startswith("encoders."):
            _, step, rest = key.split(".", 2)
            dst[key] = src[f"encoders.{path[int(step)]}.{rest}"].clone()
        else:
            dst[key] = src[key].clone()
    model.load_state_dict(dst)
    return model


def test_seed_at_its_own_depth_is_the_plain_model():
    seed = _seed()
    x, lens = _inputs()
    torch.testing.assert_close(seed(x, lens)[0], _explicit(seed, (0, 1, 2))(x, lens)[0], rtol=0, atol=0)


@pytest.mark.parametrize("depth,order", [(5, "in_place"), (6, "cycle"), (7, "in_place")])
def test_unfolding_equals_explicit_copies_and_params_do_not_grow(depth, order):
    seed = _seed(depth=depth, order=order)
    x, lens = _inputs()
    explicit = _explicit(seed, seed.plan.blocks)
    torch.testing.assert_close(seed(x, lens)[0], explicit(x, lens)[0], rtol=1e-5, atol=1e-6)
    assert seed.physical_parameters() == _seed().physical_parameters()
    assert seed.plan.depth == depth


def test_gradients_accumulate_over_repeated_uses():
    seed = _seed(depth=5)  # path (0, 1, 1, 2, 2)
    x, lens = _inputs()
    explicit = _explicit(seed, seed.plan.blocks)
    seed(x, lens)[0].square().sum().backward()
    explicit(x, lens)[0].square().sum().backward()
    got = seed.encoders[1].feed_forward.w_1.weight.grad
    want = explicit.encoders[1].feed_forward.w_1.weight.grad + explicit.encoders[2].feed_forward.w_1.weight.grad
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_plans_by_depth_and_path_index():
    seed = _seed()
    with seed.using({"depth": 5, "path_index": 2}):
        assert seed.plan.blocks == enumerate_paths(3, 5)[2]
    with pytest.raises(PlanError, match="path_index 3 is out of range: depth 5 has 3 paths"):
        seed.set_plan({"depth": 5, "path_index": 3})
    with pytest.raises(PlanError, match="breaks the unfolding rule"):
        seed.set_plan({"blocks": [0, 0, 0, 1, 2]})
    with pytest.raises(PlanError, match="below the 3 physical blocks"):
        seed.set_plan({"depth": 2})
    with pytest.raises(FoldError, match="unknown order 'spiral'"):
        _seed(order="spiral")


def test_env_plan_picks_depth_at_decode_time(monkeypatch):
    monkeypatch.setenv("ESPNET_COMPRESS_PLAN", '{"depth": 6, "path_index": 0}')
    assert _seed().plan.blocks == (0, 0, 1, 1, 2, 2)
    monkeypatch.setenv("ESPNET_COMPRESS_PLAN", "{depth: 6")
    with pytest.raises(EnvVarError, match="ESPNET_COMPRESS_PLAN: not valid JSON"):
        _seed()


FOLD_ENC = dict(tiny_conformer_options(num_blocks=2), fold={"depth": 4})


def test_joint_training_through_the_multi_system_model(asr_task, tmp_path):
    model = build(asr_task, tmp_path, encoder="foldable_conformer", enc=FOLD_ENC,
                  systems={"unfolded": {"depth": 4}, "seed": {"depth": 2, "weight": 0.25}},
                  decoder_quant=None)
    model.train()
    loss, stats, _ = model(**batch())
    torch.testing.assert_close(stats["loss"], stats["loss_unfolded"] + 0.25 * stats["loss_seed"] + 0.1 * stats["kl_seed"])
    loss.backward()
    assert model.encoder.encoders[0].feed_forward.w_1.weight.grad.abs().sum() > 0
    assert model.encoder.plan.blocks == (0, 0, 1, 1)


def _stub_foldable_training(tmp_path, monkeypatch):
    """``benchmarks/foldable.py`` with corpus and training stubbed: returns the module and the list the
    stub appends ``(system, exp dir name)`` to for every training."""
    from espnet_compress.pipeline.stages import AsrExperiment
    from tests.conftest import benchmark

    foldable = benchmark("foldable")
    template = AsrExperiment(tmp_path / "data", "train", "dev", ["test"], tmp_path / "tokens.txt",
                             tmp_path / "stats", tmp_path / "unused", Path("unused.yaml"), Path("decode.yaml"))
    trained = []
    monkeypatch.setattr(foldable, "prepare_corpus", lambda args: template)
    monkeypatch.setattr(foldable, "find_baseline", lambda *a: None)
    monkeypatch.setattr(foldable, "timed_train", lambda name, exp, epochs: trained.append((name, exp.exp_dir.name)))
    return foldable, trained


def test_foldable_benchmark_train_only_trains_the_named_systems_and_decodes_nothing(tmp_path, monkeypatch):
    """``benchmarks/foldable.py --systems ... --train_only``: one process per system shares the cores;
    each trains exactly what it was given (not even the reference baseline) and leaves decoding to a
    last run without it."""
    foldable, trained = _stub_foldable_training(tmp_path, monkeypatch)
    monkeypatch.setattr(foldable, "tagged", lambda *a: pytest.fail("--train_only must not decode"))
    assert foldable.main(["--exp_dir", str(tmp_path), "--systems", "joint_kl", "seed2_alone", "--train_only"]) == 0
    assert trained == [("seed2_alone", "asr_seed2_alone"), ("joint_kl", "asr_joint_kl")]
    assert not (tmp_path / "benchmarks" / "foldable.md").exists()


def test_foldable_benchmark_reports_a_subset_against_its_baseline(tmp_path, monkeypatch):
    """``--systems joint`` (a further seed of only the rows whose seeds disagreed) trains and decodes
    that system and the reference ``baseline4``, nothing else."""
    foldable, trained = _stub_foldable_training(tmp_path, monkeypatch)
    decoded = []

    class Stop(Exception):
        pass

    class Decode:
        def decode(self):
            raise Stop  # every job is planned before the first decode runs

    def tagged(exp, tag, env, override, out):
        decoded.append((out.name, tag))
        return Decode()

    monkeypatch.setattr(foldable, "decode_config", lambda exp_dir, encoder, out: exp_dir / "config.yaml")
    monkeypatch.setattr(foldable, "tagged", tagged)
    with pytest.raises(Stop):
        foldable.main(["--exp_dir", str(tmp_path), "--systems", "joint"])
    assert trained == [("baseline4", "asr_baseline4"), ("joint", "asr_joint")]
    assert {name for name, _ in decoded} == {"asr_baseline4", "asr_joint"}
    assert ("asr_joint", "d4_p0") in decoded and ("asr_baseline4", "d4_p0") in decoded
