"""Tests for espnet_compress.scoring: sclite WER, MAPSSWE significance, comparison table and CLI.

They run the real Debian ``sctk`` binaries (skipped if not installed); only the parameter-count tests
need torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import espnet_compress.scoring.sclite as sclite_mod
from espnet_compress.scoring import (
    ScoringInputError,
    SignificanceResult,
    SystemSpec,
    WerResult,
    compare,
    mapsswe,
    score,
)
from espnet_compress.utils.tools import MissingToolError, require_tool

REPO = Path(__file__).resolve().parents[1]

try:
    require_tool("sclite", "sctk", extra_dirs=sclite_mod.SCTK_BIN_DIRS)
    require_tool("sc_stats", "sctk", extra_dirs=sclite_mod.SCTK_BIN_DIRS)
    HAVE_SCTK = True
except MissingToolError:
    HAVE_SCTK = False
needs_sctk = pytest.mark.skipif(not HAVE_SCTK, reason="Debian package sctk not installed")

Texts = Dict[str, List[str]]


def write_text(path: Path, utts: Texts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{u} {' '.join(w)}".rstrip() + "\n" for u, w in utts.items()), encoding="utf-8")
    return path


def parse(spec: str) -> Texts:
    """'u1: a b c | u2: d' -> {'u1': ['a','b','c'], 'u2': ['d']}."""
    out: Texts = {}
    for item in spec.split("|"):
        utt, _, words = item.partition(":")
        out[utt.strip()] = words.split()
    return out


# ---------------------------------------------------------------------------------------------- WER


@needs_sctk
def test_wer_hand_computed(tmp_path: Path) -> None:
    ref = parse("u1: a b c d e | u2: f g h | u3: i j | u4: l m n o | u5: q r")
    hyp = parse(
        "u1: a x c d e"  # 1 sub
        "| u2: f h"  # 1 del
        "| u3: i j k"  # 1 ins
        "| u4: p m n"  # 1 sub + 1 del
        "| u5: q r"  # correct
    )
    ref_text = write_text(tmp_path / "ref" / "text", ref)
    res = score(ref_text, write_text(tmp_path / "hyp" / "text", hyp), tmp_path / "s")
    assert (res.num_sentences, res.num_words) == (5, 16)
    assert (res.correct, res.substitutions, res.deletions, res.insertions) == (12, 2, 2, 1)
    assert res.errors == 5
    assert res.wer == pytest.approx(100.0 * 5 / 16)
    assert res.sentence_errors == 4
    assert res.ser == pytest.approx(80.0)
    for p in (res.result_txt, res.sgml, res.ref_trn, res.hyp_trn):
        assert p.is_file()
    # Without utt2spk every utterance is its own speaker, in asr.sh's "(spk-utt)" form.
    assert res.hyp_trn.read_text().splitlines()[0] == "a x c d e (u1-u1)"


@needs_sctk
def test_speakers_from_utt2spk(tmp_path: Path) -> None:
    ref = parse("spkA-1: a b | spkA-2: c d | spkB-1: e f")
    ref_text = write_text(tmp_path / "data" / "text", ref)
    (tmp_path / "data" / "utt2spk").write_text("spkA-1 spkA\nspkA-2 spkA\nspkB-1 spkB\n")
    res = score(ref_text, write_text(tmp_path / "hyp" / "text", ref), tmp_path / "s", name="sysA")
    assert res.wer == 0.0
    assert "b (spkA-spkA-1)" in res.ref_trn.read_text()
    report = res.result_txt.read_text()
    # sclite folds ids to lower case in its reports
    assert "| spka " in report and "| spkb " in report and "sysA" in report


@needs_sctk
def test_missing_and_empty_hyp_utterances_are_deletions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref = parse("u1: a b | u2: c d e | u3: f g")
    hyp_text = tmp_path / "hyp" / "text"
    hyp_text.parent.mkdir()
    hyp_text.write_text("u1 a b\nu3\n")  # u2 missing entirely, u3 decoded to nothing
    res = score(write_text(tmp_path / "ref" / "text", ref), hyp_text, tmp_path / "s")
    assert "lacks 1 of 3 reference utterances (e.g. 'u2')" in caplog.text
    assert (res.num_sentences, res.num_words) == (3, 7)
    assert (res.correct, res.substitutions, res.deletions, res.insertions) == (2, 0, 5, 0)
    assert res.sentence_errors == 2


@needs_sctk
def test_unknown_hyp_id_is_an_error(tmp_path: Path) -> None:
    ref_text = write_text(tmp_path / "ref" / "text", parse("u1: a | u2: b"))
    hyp_text = write_text(tmp_path / "hyp" / "text", parse("u1: a | zz9: b"))
    with pytest.raises(ScoringInputError, match=r"(?s)hyp/text.*'zz9'"):
        score(ref_text, hyp_text, tmp_path / "s")


@needs_sctk
def test_duplicate_id_is_an_error(tmp_path: Path) -> None:
    ref_text = write_text(tmp_path / "ref" / "text", parse("u1: a | u2: b"))
    hyp_text = tmp_path / "hyp" / "text"
    hyp_text.parent.mkdir()
    hyp_text.write_text("u1 a\nu1 b\n")
    with pytest.raises(ScoringInputError, match=r"hyp/text:2: duplicate utterance id 'u1'"):
        score(ref_text, hyp_text, tmp_path / "s")


def test_missing_sclite_names_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sclite_mod, "SCTK_BIN_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    ref_text = write_text(tmp_path / "ref" / "text", parse("u1: a"))
    with pytest.raises(MissingToolError, match=r"apt-get install sctk"):
        score(ref_text, ref_text, tmp_path / "s")


# ----------------------------------------------------------------------------------------- MAPSSWE

N_SENT, N_WORDS = 60, 10
REF: Texts = {f"utt{i:03d}": [f"w{(7 * i + 3 * j) % 97}" for j in range(N_WORDS)] for i in range(N_SENT)}


def with_errors(errors_per_sentence: Dict[str, int], base: Texts = REF, tag: str = "x") -> Texts:
    """Copy of ``base`` with k more substitutions in the given sentences, at positions 9, 6, ...: for
    k <= 2 they never touch BASELINE's own errors (positions 0 and 3) and form separate segments."""
    out = {u: list(w) for u, w in base.items()}
    for utt, k in errors_per_sentence.items():
        for n in range(k):
            out[utt][N_WORDS - 1 - 3 * n] = f"{tag}{n}"
    return out


# A realistic baseline: 0, 1 or 2 substitutions (positions 0 and 3) depending on the sentence.
BASE_ERRORS = {u: [0, 1, 0, 2][i % 4] for i, u in enumerate(REF)}
BASELINE = {
    u: [(f"b{j}" if j % 3 == 0 and j // 3 < BASE_ERRORS[u] else w) for j, w in enumerate(ws)]
    for u, ws in REF.items()
}
UTTS = list(REF)


def score_pair(tmp_path: Path, base: Texts, system: Texts) -> Tuple[WerResult, WerResult]:
    ref_text = write_text(tmp_path / "data" / "text", REF)
    b = score(ref_text, write_text(tmp_path / "base" / "text", base), tmp_path / "score_base", name="base")
    s = score(ref_text, write_text(tmp_path / "sys" / "text", system), tmp_path / "score_sys", name="sys")
    return b, s


def assert_consistent(sig: SignificanceResult) -> None:
    """The pure-Python per-utterance statistic must agree with sc_stats' own (95%) verdict."""
    assert sig.sentence.p_value is not None
    assert (sig.sentence.p_value < sig.alpha) == sig.significant
    if sig.source == "nist":
        assert sig.sc_stats_verdict == sig.better


@needs_sctk
def test_mapsswe_identical_systems_are_same(tmp_path: Path) -> None:
    b, s = score_pair(tmp_path, BASELINE, BASELINE)
    assert b.errors == 45  # 15 * (1 + 2)
    sig = mapsswe(b, s, tmp_path / "sig")
    assert (sig.better, sig.significant, sig.lossless) == ("same", False, True)
    assert sig.source == "nist" and sig.p_value == pytest.approx(1.0)
    assert sig.sc_stats_verdict == "same"
    assert_consistent(sig)


@needs_sctk
def test_mapsswe_many_extra_errors_is_significantly_worse(tmp_path: Path) -> None:
    system = with_errors({u: 1 for u in UTTS[:40]}, base=BASELINE)
    b, s = score_pair(tmp_path, BASELINE, system)
    assert s.errors == b.errors + 40
    sig = mapsswe(b, s, tmp_path / "sig")
    assert (sig.better, sig.significant, sig.lossless) == ("baseline", True, False)
    assert sig.source == "nist" and sig.p_value < 1e-6
    assert sig.nist.mean < 0 and sig.nist.z < 0  # d = errors(baseline) - errors(system)
    assert_consistent(sig)
    # Same data, roles swapped: the system is now the significantly better one (and lossless).
    rev = mapsswe(s, b, tmp_path / "sig_rev")
    assert (rev.better, rev.significant, rev.lossless) == ("system", True, True)
    assert rev.p_value == pytest.approx(sig.p_value)


@needs_sctk
def test_mapsswe_one_extra_error_is_not_significant(tmp_path: Path) -> None:
    system = with_errors({UTTS[5]: 1}, base=BASELINE)
    b, s = score_pair(tmp_path, BASELINE, system)
    assert s.errors == b.errors + 1
    sig = mapsswe(b, s, tmp_path / "sig")
    assert (sig.better, sig.significant, sig.lossless) == ("same", False, True)
    assert sig.source == "nist" and 0.05 < sig.p_value < 1.0
    assert_consistent(sig)


@needs_sctk
def test_mapsswe_alpha_is_respected(tmp_path: Path) -> None:
    # 6 extra errors in 60 sentences: significant at 0.05 on the NIST segments, not at 0.001.
    system = with_errors({u: 1 for u in UTTS[:6]}, base=BASELINE)
    b, s = score_pair(tmp_path, BASELINE, system)
    loose = mapsswe(b, s, tmp_path / "a", alpha=0.05)
    strict = mapsswe(b, s, tmp_path / "b", alpha=0.001)
    assert loose.p_value == strict.p_value and 0.001 < loose.p_value < 0.05
    assert (loose.significant, loose.lossless) == (True, False)
    assert (strict.significant, strict.lossless) == (False, True)


@needs_sctk
def test_mapsswe_zero_variance_falls_back_to_sentence_statistic(tmp_path: Path) -> None:
    # Perfect baseline, one extra error in each of 40 sentences: every NIST segment differs by exactly
    # one error, sc_stats reports Z=0 ("same") -- the per-utterance statistic must decide instead.
    b, s = score_pair(tmp_path, REF, with_errors({u: 1 for u in UTTS[:40]}))
    sig = mapsswe(b, s, tmp_path / "sig")
    assert sig.sc_stats_verdict == "same" and sig.nist is not None and sig.nist.z is None
    assert sig.source == "sentence"
    assert (sig.better, sig.significant, sig.lossless) == ("baseline", True, False)
    # ... while a single extra error stays lossless under the same fallback.
    b1, s1 = score_pair(tmp_path / "one", REF, with_errors({UTTS[0]: 1}))
    one = mapsswe(b1, s1, tmp_path / "sig1")
    assert one.source == "sentence" and (one.significant, one.lossless) == (False, True)


@needs_sctk
def test_mapsswe_two_perfect_systems(tmp_path: Path) -> None:
    # sc_stats crashes when there is no error segment at all; it must not be called.
    b, s = score_pair(tmp_path, REF, REF)
    sig = mapsswe(b, s, tmp_path / "sig")
    assert sig.nist is None and sig.source == "sentence"
    assert (sig.better, sig.significant, sig.p_value) == ("same", False, 1.0)


@needs_sctk
def test_mapsswe_rejects_different_references(tmp_path: Path) -> None:
    b, _ = score_pair(tmp_path / "x", REF, REF)
    other = {u: w[:-1] for u, w in REF.items()}
    ref2 = write_text(tmp_path / "y" / "data" / "text", other)
    s = score(ref2, write_text(tmp_path / "y" / "hyp" / "text", other), tmp_path / "y" / "s")
    with pytest.raises(ScoringInputError, match="same reference"):
        mapsswe(b, s, tmp_path / "sig")


# -------------------------------------------------------------------------------- compare and CLI


def make_experiment(root: Path) -> Dict[str, Path]:
    """data/{test,dev}/text plus decode dirs for a baseline, a lossy and a lossless system."""
    dev_ref = {u: w for u, w in list(REF.items())[:20]}
    dev_base = {u: w for u, w in list(BASELINE.items())[:20]}
    write_text(root / "data" / "test" / "text", REF)
    write_text(root / "data" / "dev" / "text", dev_ref)
    systems = {
        "base": (BASELINE, dev_base),
        "lossy": (
            with_errors({u: 1 for u in UTTS[:40]}, base=BASELINE),
            with_errors({u: 1 for u in UTTS[:15]}, base=dev_base),
        ),
        "tiny": (with_errors({UTTS[3]: 1}, base=BASELINE), dev_base),
    }
    dirs = {}
    for name, (test_hyp, dev_hyp) in systems.items():
        dirs[name] = root / "exp" / name / "decode"
        write_text(dirs[name] / "test" / "text", test_hyp)
        write_text(dirs[name] / "dev" / "text", dev_hyp)
    return dirs


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "espnet_compress.bin.compare", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


@needs_sctk
def test_compare_api(tmp_path: Path) -> None:
    dirs = make_experiment(tmp_path)
    systems = [
        SystemSpec("base", dirs["base"], None, 1000),
        SystemSpec("lossy", dirs["lossy"], None, 250),
        SystemSpec("tiny", dirs["tiny"], None, 500),
    ]
    table = compare(systems, "base", tmp_path / "data", ["test", "dev"], tmp_path / "out")
    md = table.to_markdown()
    assert md == (tmp_path / "out" / "compare.md").read_text()
    lines = md.splitlines()
    assert lines[0] == (
        "| system | parameters | checkpoint bytes | size ratio "
        "| WER test (%) | MAPSSWE test | WER dev (%) | MAPSSWE dev |"
    )
    assert lines[2] == "| base | 1,000 | n/a | n/a | 7.50 | baseline | 7.50 | baseline |"
    assert lines[3] == "| lossy | 250 | n/a | n/a | 14.17 | worse (p<0.001) | 15.00 | worse (p<0.001) |"
    assert lines[4] == "| tiny | 500 | n/a | n/a | 7.67 | lossless | 7.50 | lossless |"
    assert "alpha=0.05" in md and "lossless" in md.split("\n\n", 1)[1]
    assert not list((tmp_path / "out").glob("*.tmp"))


@needs_sctk
def test_cli_end_to_end(tmp_path: Path) -> None:
    dirs = make_experiment(tmp_path)
    out = tmp_path / "out"
    proc = run_cli(
        "--ref_dir", str(tmp_path / "data"), "--test_sets", "test",
        "--baseline", "base",
        "--system", "base", str(dirs["base"]),
        "--system", "lossy", str(dirs["lossy"]),
        "--system", "tiny", str(dirs["tiny"]),
        "--out_dir", str(out), "--alpha", "0.01",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (out / "compare.md").read_text()
    assert "| lossy | n/a | n/a | n/a | 14.17 | worse (p<0.001) |" in proc.stdout
    data = json.loads((out / "compare.json").read_text())
    assert data["baseline"] == "base" and data["alpha"] == 0.01 and data["test_sets"] == ["test"]
    by_name = {s["name"]: s for s in data["systems"]}
    assert list(by_name) == ["base", "lossy", "tiny"]
    base_t = by_name["base"]["test_sets"]["test"]
    assert base_t["verdict"] == "baseline" and base_t["significance"] is None
    assert base_t["wer"]["errors"] == 45 and base_t["wer"]["num_words"] == 600
    lossy_t = by_name["lossy"]["test_sets"]["test"]
    assert lossy_t["wer"]["errors"] == 85 and lossy_t["wer"]["wer"] == pytest.approx(85 / 6)
    assert lossy_t["significance"]["better"] == "baseline" and lossy_t["significance"]["lossless"] is False
    tiny_t = by_name["tiny"]["test_sets"]["test"]
    assert tiny_t["verdict"] == "lossless" and tiny_t["significance"]["lossless"] is True
    assert 0.01 < tiny_t["significance"]["p_value"] <= 1.0


BAD_INPUTS = {
    "unknown baseline": "baseline 'nope' is not one of the systems",
    "missing decode dir": "decode dir of system 'tiny' not found",
    "missing reference": "reference text not found",
    "--system with one value": "--system takes NAME DECODE_DIR [MODEL_FILE]",
    "missing model file": "model file of system 'x' not found: /no/such/model.pth",
}


@needs_sctk
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_exits_2(tmp_path: Path, case: str) -> None:
    dirs = make_experiment(tmp_path)
    baseline = "nope" if case == "unknown baseline" else "base"
    test_set = "eval" if case == "missing reference" else "test"
    tiny_dir = str(dirs["tiny"]) + ("_missing" if case == "missing decode dir" else "")
    args = [
        "--ref_dir", str(tmp_path / "data"), "--test_sets", test_set,
        "--baseline", baseline,
        "--system", "base", str(dirs["base"]),
        "--system", "tiny", tiny_dir,
        "--out_dir", str(tmp_path / "out"),
    ]
    if case == "--system with one value":
        args += ["--system", "onlyname"]
    if case == "missing model file":
        args += ["--system", "x", str(dirs["tiny"]), "/no/such/model.pth"]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert BAD_INPUTS[case] in proc.stderr
    assert not (tmp_path / "out" / "compare.md").exists()


# ------------------------------------------------------------------------------- parameter count


@needs_sctk
def test_cli_refuses_a_model_file_without_its_config(tmp_path: Path) -> None:
    """Parameters are counted on the model a training config builds (buffers are not parameters;
    tests/test_recipe_user_path.py counts real models), so a bare state dict is refused up front."""
    torch = pytest.importorskip("torch")
    dirs = make_experiment(tmp_path)
    bare = tmp_path / "bare.pth"
    torch.save(torch.nn.Linear(10, 10).state_dict(), bare)
    proc = run_cli(
        "--ref_dir", str(tmp_path / "data"), "--test_sets", "test", "--baseline", "base",
        "--system", "base", str(dirs["base"]), str(bare), "--out_dir", str(tmp_path / "out"),
    )
    assert proc.returncode == 2
    assert "model file of system 'base' has no config.yaml beside it" in proc.stderr and str(bare) in proc.stderr
    assert not (tmp_path / "out" / "compare.md").exists()
