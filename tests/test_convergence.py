"""The stopping rule every baseline and twin shares: replaying a logged run gives the epoch ESPnet stopped at.

``fixtures/early_stopping`` is the ``epoch results`` part of a real ``asr_train`` log (a 2-block
d-32 Conformer on 80 utterances, ``patience: 1`` on valid acc) and the stopping options of its config:
ESPnet stopped it at epoch 8, keeping epoch 6.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from espnet_compress.pipeline.convergence import (StoppingRule, curve_from_log, curve_table, plot_curves,
                                                  read_curve, stopped_epoch_from_log)
from tests.conftest import benchmark

FIXTURE = Path(__file__).parent / "fixtures" / "early_stopping"


def _curve(values, key="acc"):
    return {e: {"valid": {key: v}, "train": {"total_count": 10.0 * e}} for e, v in enumerate(values, start=1)}


def test_replayed_log_stops_where_espnet_stopped():
    text = (FIXTURE / "train.log").read_text()
    curve = curve_from_log(text)
    rule = StoppingRule.from_config(yaml.safe_load((FIXTURE / "config.yaml").read_text()))
    assert rule == StoppingRule(1, ("valid", "acc", "max"), 12)
    assert sorted(curve) == list(range(1, 9))
    assert stopped_epoch_from_log(text) == 8
    assert rule.stop_epoch(curve) == 8
    assert rule.best_epoch(curve) == 6
    assert curve[6]["valid"]["acc"] == pytest.approx(0.226)


def test_rule_on_hand_made_curves():
    rising_then_flat = _curve([0.1, 0.3, 0.5, 0.5, 0.49, 0.48, 0.6])
    # ESPnet stops when epoch - best_epoch > patience; a tie is no improvement (best stays the earliest)
    assert StoppingRule(2, ("valid", "acc", "max"), 40).stop_epoch(rising_then_flat) == 6
    assert StoppingRule(2, ("valid", "acc", "max"), 40).best_epoch(rising_then_flat) == 3
    assert StoppingRule(3, ("valid", "acc", "max"), 40).stop_epoch(rising_then_flat) == 7
    assert StoppingRule(3, ("valid", "acc", "max"), 40).best_epoch(rising_then_flat) == 7
    assert StoppingRule(None, ("valid", "acc", "max"), 5).stop_epoch(rising_then_flat) == 5
    loss = _curve([5.0, 4.0, 4.5, 4.6], key="loss")
    assert StoppingRule(1, ("valid", "loss", "min"), 40).stop_epoch(loss) == 4
    assert StoppingRule(1, ("valid", "loss", "min"), 40).best_epoch(loss) == 2


def test_config_defaults_and_bad_criterion():
    assert StoppingRule.from_config({}) == StoppingRule(None, ("valid", "loss", "min"), 40)
    assert StoppingRule.from_config({"patience": "none", "max_epoch": 3}).patience is None
    with pytest.raises(ValueError, match="early_stopping_criterion"):
        StoppingRule.from_config({"early_stopping_criterion": ["valid", "acc", "up"]})


def test_read_curve_plot_and_table(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "train.log").write_text((FIXTURE / "train.log").read_text())
    curve = read_curve(exp)
    rule = StoppingRule(1, ("valid", "acc", "max"), 12)
    png = plot_curves({"tiny": curve}, tmp_path / "curve.png", rule)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = curve_table(curve)
    assert table.count("\n") == 2 + 8 and "| 6 |" in table
    with pytest.raises(FileNotFoundError, match="no checkpoint.pth or train.log"):
        read_curve(tmp_path / "missing")


def test_benchmarks_reuse_an_early_stopped_baseline_only_under_the_same_rule(tmp_path):
    """The fixture's run (cap 12, stopped at 8): a benchmark under the configs' stopping rule reuses
    it; one that trains every epoch (``all_epochs``, the one-bit benchmark) must train its own."""
    find_baseline = benchmark("nested_supernet").find_baseline

    exp = tmp_path / "asr_conformer"
    exp.mkdir()
    for name in ("train.log", "config.yaml"):
        (exp / name).write_text((FIXTURE / name).read_text())
    (exp / "valid.acc.best.pth").write_bytes(b"")
    (exp / "train.done").write_text("")
    assert find_baseline(tmp_path, 12) == exp
    assert find_baseline(tmp_path, 12, all_epochs=True) is None
    assert find_baseline(tmp_path, 8) is None  # asked for another cap


def test_nested_benchmark_reports_full_against_its_equal_compute_control(tmp_path):
    """``nested_supernet.py --control_epochs``: the section states what the baseline, the control and
    the all-in-one model each trained for (epochs under the rule, kept epoch, updates) next to the
    WERs and the MAPSSWE verdict of ``full`` against the control, and plots the three dev curves."""
    from types import SimpleNamespace

    from espnet_compress.scoring.significance import SignificanceResult

    bench = benchmark("nested_supernet")
    exps = {}
    for name in ("asr_conformer", "asr_conformer_80ep", "asr_nested"):
        exp = tmp_path / name
        exp.mkdir()
        for f in ("train.log", "config.yaml"):
            (exp / f).write_text((FIXTURE / f).read_text())
        exps[name] = SimpleNamespace(exp_dir=exp)
    records = {k: bench.TrainRecord(k, tmp_path, s, "timer", False, c)
               for k, s, c in (("conformer", 100.0, 90.0), ("control", 200.0, 180.0), ("all-in-one", 210.0, 190.0))}
    sig = SignificanceResult(0.05, 0.012, "system", True, "nist", None, None, None, None)
    table = SimpleNamespace(rows=[SimpleNamespace(wer={"test": SimpleNamespace(wer=2.5)}, significance={"test": None}),
                                  SimpleNamespace(wer={"test": SimpleNamespace(wer=1.5)}, significance={"test": sig})])
    report = bench._control_report("conformer_80ep", table, exps["asr_conformer"], exps["asr_conformer_80ep"],
                                   exps["asr_nested"], records, tmp_path, "")
    assert report["verdict"] == "better (p=0.012)" and (report["control_wer"], report["full_wer"]) == (2.5, 1.5)
    trained = report["trained"]["conformer_80ep"]
    assert (trained["epochs"], trained["kept_epoch"], trained["wall_seconds"], trained["cpu_seconds"]) == (8, 6, 200.0, 180.0)
    assert Path(report["plot"]).is_file() and Path(report["plot"]).name == "nested_supernet_dev_acc.png"

    row = bench.Row(system="full", spec={}, nested_params=1, nested_bytes=1, nested_file="f", nested_stock=True,
                    nested_wer=1.5, twin="conformer", twin_params=1, twin_bytes=1, twin_file="t", twin_wer=3.0,
                    verdict="better", p_value=0.01, twin_train_seconds=100.0, twin_train_cpu_seconds=90.0)
    args = SimpleNamespace(config=bench.NESTED_CONFIG, max_epoch=None)
    storage = dict(all_in_one_bytes=1, largest_system_bytes=1, exported_sum_bytes=1, twins_sum_bytes=1, num_systems=1,
                   all_in_one_vs_largest=1.0, exported_sum_vs_largest=1.0, twins_sum_vs_largest=1.0,
                   twins_sum_vs_all_in_one=1.0)
    cost = dict(one_pass_seconds=1.0, separate_sum_seconds=1.0, speedup_separate_over_one_pass=1.0,
                one_pass_cpu_seconds=None, separate_sum_cpu_seconds=None, cpu_speedup_separate_over_one_pass=None,
                time_sources={})
    text = bench._markdown([row], storage, cost, "(table)", args, {}, report)
    section = text.split("### `full` against the equal-compute control `conformer_80ep`")[1]
    assert "| conformer | 8 epochs (kept 6)" in section and "| 3.00 |" in section
    assert "| all-in-one, system `full` | 8 epochs (kept 6)" in section and "| 1.50 |" in section
    assert "| 200 / 180 | 2.50 |" in section
    assert "MAPSSWE nested `full` vs `conformer_80ep`: better (p=0.012)." in section
