"""Seeds lined up: mean, spread and per-seed verdicts of one comparison run with several seeds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from espnet_compress.bin.seeds_report import main
from espnet_compress.scoring.seeds import seed_table


def _run(wers, verdicts, baseline="conformer", names=("conformer", "q4")):
    return {"baseline": baseline, "systems": [
        {"name": n, "test_sets": {"test": {"wer": {"wer": w}, "verdict": v}}} for n, w, v in zip(names, wers, verdicts)]}


def test_mean_spread_and_agreement():
    table = seed_table({"s0": _run([7.0, 9.0], ["baseline", "worse (p=0.01)"]),
                        "s1": _run([5.0, 6.0], ["baseline", "lossless"])})
    base, q4 = table.rows
    assert base.mean == pytest.approx(6.0) and base.spread == pytest.approx(2 ** 0.5)
    assert q4.mean == pytest.approx(7.5) and not q4.agree and base.agree
    md = table.to_markdown()
    assert "| q4 | 9.00 | 6.00 | 7.50 | 2.12 | s0: worse (p=0.01); s1: lossless | NO |" in md


def test_mismatched_runs_are_refused():
    with pytest.raises(ValueError, match="different baselines"):
        seed_table({"s0": _run([1, 2], ["baseline", "lossless"]), "s1": _run([1, 2], ["baseline", "lossless"], "q4")})
    with pytest.raises(ValueError, match="has systems"):
        seed_table({"s0": _run([1, 2], ["baseline", "lossless"]),
                    "s1": _run([1], ["baseline"], names=("conformer",))})


def test_cli_groups_comparisons_by_path(tmp_path):
    for seed, wers in (("s0", [7.0, 8.0]), ("s1", [6.0, 6.5])):
        for rel in ("compare", "compare_vs_ft"):
            d = tmp_path / seed / rel
            d.mkdir(parents=True)
            (d / "compare.json").write_text(json.dumps(_run(wers, ["baseline", "lossless"])))
    out = tmp_path / "seeds.md"
    assert main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## `compare`" in text and "## `compare_vs_ft`" in text
    assert json.loads(out.with_suffix(".json").read_text())["compare"]["rows"][1]["mean"] == pytest.approx(7.25)
    (tmp_path / "s1" / "compare_vs_ft" / "compare.json").unlink()
    assert main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "x.md")]) == 2
    assert not (tmp_path / "x.md").exists()
