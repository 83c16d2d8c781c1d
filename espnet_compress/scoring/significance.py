"""Is a compressed model's WER difference to its baseline real? The MAPSSWE matched-pairs test.

A compressed model is only "lossless" if the baseline is not *significantly* better than it; raw WER
deltas of a few tenths of a percent on a small test set are usually noise. We use the NIST matched
pair sentence segment word error (MAPSSWE) test because it is the one ASR papers report and the one
shipped with sclite (``sc_stats -t mapsswe``).

Two statistics are computed for every comparison:

``nist`` (source of truth)
    ``sc_stats``' own MAPSSWE: both systems' alignments are cut into segments bounded by at least two
    words that both systems got right; per segment, ``d = errors(baseline) - errors(system)``;
    ``Z = mean(d) / (sd(d) / sqrt(n))``; two-sided normal p-value. ``sc_stats`` prints ``Z`` (three
    decimals) but only a fixed-95% verdict, so the p-value is ``erfc(|Z|/sqrt 2)`` -- the same formula
    sc_stats uses for the "minimum p" column of its unified report -- and the verdict at ``alpha`` is
    derived from it.

``sentence`` (pure Python, cross-check and fallback)
    the same statistic with each utterance as one segment (all utterances, including error-free
    ones), from sclite's per-utterance scores. It is used instead of ``nist`` only where sc_stats'
    statistic is undefined: (a) neither system makes any error -- sc_stats then finds no segment and
    crashes; (b) every segment has the same non-zero difference (``sd = 0``), e.g. a perfect baseline
    vs a system with one extra error per segment -- sc_stats then reports ``Z = 0``, "same", which
    would wrongly call a uniformly worse system lossless.
"""
from __future__ import annotations

import logging
import math
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import espnet_compress.scoring.sclite as sclite_mod
from espnet_compress.scoring.sclite import (
    ScoringInputError,
    WerResult,
    run_checked,
    sentence_errors,
)
from espnet_compress.utils.tools import require_tool

logger = logging.getLogger(__name__)

#: Titles given to the two systems inside sc_stats: fixed so that two systems that were both scored
#: under the default name "hyp" cannot collide, and so the report is unambiguous to parse.
_BASELINE_TITLE = "baseline"
_SYSTEM_TITLE = "system"

_MTCH_RE = re.compile(
    r"MTCH_PR_RESULTS \(systems: (?P<sys1>\S+) (?P<sys2>\S+)\) \(# segs: (?P<n>\d+)\).*?"
    r"\(mean: (?P<mean>\S+)\) \(std dev: (?P<sd>\S+)\) \(Z Stat: (?P<z>\S+)\) \(Stat Diff: (?P<diff>Yes|No)\)"
)
_TITLE_RE = re.compile(r'(<SYSTEM\b[^>]*?\btitle=")[^"]*(")')


@dataclass(frozen=True)
class MatchedPairs:
    """One matched-pairs statistic over segment differences ``d = errors(baseline) - errors(system)``.

    ``mean > 0`` means the baseline makes more errors (the system is better). ``z``/``p_value`` are
    None where the statistic is undefined.
    """

    num_segments: int
    mean: float
    std_dev: float
    z: Optional[float]
    p_value: Optional[float]


@dataclass(frozen=True)
class SignificanceResult:
    """Outcome of ``mapsswe``; ``source`` says which statistic (``"nist"``/``"sentence"``) decided."""

    alpha: float
    p_value: Optional[float]
    better: str  # "baseline" | "system" | "same"
    significant: bool
    source: str
    nist: Optional[MatchedPairs]
    sentence: MatchedPairs
    sc_stats_verdict: Optional[str]  # sc_stats' own fixed-95% verdict, for the record
    report: Optional[Path]

    @property
    def lossless(self) -> bool:
        """True unless the baseline is significantly better (a significantly better system counts)."""
        return not (self.significant and self.better == "baseline")

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready view."""
        d = asdict(self)
        d["report"] = None if self.report is None else str(self.report)
        d["lossless"] = self.lossless
        return d


def two_sided_p(z: float) -> float:
    """Two-sided standard-normal tail probability ``P(|N(0,1)| >= |z|)``."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def sentence_matched_pairs(baseline: WerResult, system: WerResult) -> MatchedPairs:
    """Matched-pairs statistic with one segment per utterance (pure Python).

    With ``sd = 0`` the difference is identical on every utterance: no difference at all (p = 1) or a
    deterministic one (p = 0, z = +-inf). Fewer than two utterances leave the variance undefined.
    """
    base_err = sentence_errors(baseline.result_txt)
    sys_err = sentence_errors(system.result_txt)
    for res, errs in ((baseline, base_err), (system, sys_err)):
        if len(errs) != res.num_sentences or sum(errs.values()) != res.errors:
            raise RuntimeError(
                f"per-utterance scores in {res.result_txt} do not add up to its totals"
            )
    if base_err.keys() != sys_err.keys():
        raise ScoringInputError(
            f"{baseline.result_txt} and {system.result_txt} score different utterances"
        )
    diffs = [base_err[k] - sys_err[k] for k in base_err]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return MatchedPairs(n, mean, float("nan"), None, None)
    sd = statistics.stdev(diffs)
    if sd == 0.0:
        z = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        z = mean / (sd / math.sqrt(n))
    return MatchedPairs(n, mean, sd, z, two_sided_p(z))


def _retitled_sgml(result: WerResult, title: str) -> str:
    """The SGML alignment of ``result`` with its system title replaced by ``title``."""
    text = result.sgml.read_text(encoding="utf-8")
    new, count = _TITLE_RE.subn(rf"\g<1>{title}\g<2>", text, count=1)
    if count != 1:
        raise RuntimeError(f"no <SYSTEM title=...> header in {result.sgml}")
    return new


def _nist_matched_pairs(
    baseline: WerResult, system: WerResult, out_dir: Path
) -> Tuple[MatchedPairs, str, Path]:
    """Run ``sc_stats -t mapsswe -v`` and parse its MTCH_PR_RESULTS line.

    ``-v`` (without ``-u``) is needed: only the verbose per-pair report prints Z, mean and sd; the
    unified report (``-u``) shows just a 3-decimal p and the 95% verdict.
    """
    # Looked up through the module so a patched search path (tests, odd installs) applies here too.
    sc_stats = require_tool("sc_stats", sclite_mod.SCTK_DEBIAN_PACKAGE, extra_dirs=sclite_mod.SCTK_BIN_DIRS)
    stdin = _retitled_sgml(baseline, _BASELINE_TITLE) + _retitled_sgml(system, _SYSTEM_TITLE)
    run_checked(
        [sc_stats, "-p", "-t", "mapsswe", "-v", "-n", "mapsswe", "-O", str(out_dir), "-f", "0"],
        stdin=stdin,
    )
    report = out_dir / "mapsswe.stats.mapsswe"
    m = _MTCH_RE.search(report.read_text(encoding="utf-8")) if report.is_file() else None
    if m is None:
        raise RuntimeError(f"no MTCH_PR_RESULTS line in sc_stats report {report}")
    order = (m["sys1"], m["sys2"])
    if order == (_BASELINE_TITLE, _SYSTEM_TITLE):
        sign = 1.0
    elif order == (_SYSTEM_TITLE, _BASELINE_TITLE):
        sign = -1.0
    else:
        raise RuntimeError(f"unexpected systems {order} in {report}")
    mean, sd, z = sign * float(m["mean"]), float(m["sd"]), sign * float(m["z"])
    if m["diff"] == "No":
        verdict = "same"
    else:
        verdict = "system" if mean > 0 else "baseline"
    if sd == 0.0 and mean != 0.0:
        # sc_stats sets Z = 0 when the variance vanishes; the statistic is really undefined here.
        stat = MatchedPairs(int(m["n"]), mean, sd, None, None)
    else:
        stat = MatchedPairs(int(m["n"]), mean, sd, z, two_sided_p(z))
    return stat, verdict, report


def mapsswe(baseline: WerResult, system: WerResult, out_dir: Path, alpha: float = 0.05) -> SignificanceResult:
    """MAPSSWE test of ``system`` against ``baseline`` on the same test set, at level ``alpha``.

    ``significant`` is ``p_value < alpha`` (two-sided); ``better`` names the system with fewer errors
    if significant, else ``"same"``. See the module docstring for which statistic decides.

    Raises:
        ScoringInputError: the two results were not scored against the same reference.
        espnet_compress.utils.tools.MissingToolError: sc_stats is not installed.
        RuntimeError: sc_stats failed or its report could not be parsed.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if baseline.ref_trn.read_bytes() != system.ref_trn.read_bytes():
        raise ScoringInputError(
            f"{baseline.ref_trn} and {system.ref_trn} differ: MAPSSWE needs both systems scored "
            "against the same reference"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    sentence = sentence_matched_pairs(baseline, system)
    nist: Optional[MatchedPairs] = None
    verdict: Optional[str] = None
    report: Optional[Path] = None
    if baseline.errors + system.errors > 0:
        nist, verdict, report = _nist_matched_pairs(baseline, system, out_dir)

    if nist is not None and nist.z is not None:
        source, decisive = "nist", nist
    else:
        source, decisive = "sentence", sentence
        logger.info(
            "sc_stats' MAPSSWE statistic is undefined for %s vs %s (no error segments or zero variance); "
            "using the per-utterance statistic", system.name, baseline.name,
        )
    p = decisive.p_value
    significant = p is not None and p < alpha
    better = ("system" if decisive.mean > 0 else "baseline") if significant else "same"
    if source == "nist" and sentence.p_value is not None and (sentence.p_value < alpha) != significant:
        # Legitimate near the threshold (different segmentations), but worth a look when it happens.
        logger.warning(
            "%s vs %s: NIST segment MAPSSWE (p=%.4g) and per-utterance test (p=%.4g) disagree at alpha=%g",
            system.name, baseline.name, p, sentence.p_value, alpha,
        )
    return SignificanceResult(
        alpha=alpha,
        p_value=p,
        better=better,
        significant=significant,
        source=source,
        nist=nist,
        sentence=sentence,
        sc_stats_verdict=verdict,
        report=report,
    )
