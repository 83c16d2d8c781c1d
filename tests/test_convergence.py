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
