"""Word error rate with NIST ``sclite``, scored exactly the way ESPnet's ``asr.sh`` (stage 13) does.

Why sclite and not a Python edit distance: every WER that ESPnet reports in ``RESULTS.md`` comes from
``sclite -i rm -o all stdout``; scoring a compressed model any other way would make its numbers
incomparable with the published baseline (sclite is case-insensitive by default, has its own
tie-breaking in the alignment, treats ``(word)`` as optionally deletable, ...). sclite also writes the
SGML alignment that ``sc_stats`` needs for the MAPSSWE significance test (see ``significance.py``).

Conventions copied (not the code) from ``egs2/TEMPLATE/asr1/asr.sh``:

* Kaldi ``text`` files (``utt_id word word ...``) become ``trn`` lines ``word word ... (spk-utt_id)``;
  sclite's ``-i rm`` id type takes everything before the first ``-`` as the speaker, which gives the
  per-speaker tables in ``result.txt``. The speaker comes from ``utt2spk`` next to the reference
  ``text`` (as asr.sh does); without it each utterance is its own speaker (``(utt_id-utt_id)``),
  which is what Kaldi assumes when a data dir has no speaker information.
* The hypothesis is not text-normalised here: asr.sh applies the ``cleaner`` only to the reference.
  Callers that need a cleaner must apply it to the reference ``text`` beforehand.
"""
from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from espnet_compress.utils.tools import require_tool

logger = logging.getLogger(__name__)

#: Debian's ``sctk`` package installs the binaries here, not on PATH. Module-level so tests can
#: point the search somewhere empty.
SCTK_BIN_DIRS: Tuple[str, ...] = ("/usr/lib/sctk/bin",)
SCTK_DEBIAN_PACKAGE = "sctk"

#: System names become sclite titles, SGML attributes and directory names, so keep them to characters
#: that survive all three unquoted.
_NAME_RE = re.compile(r"^\w[\w.+-]*$")

# "| Sum |  #Snt #Wrd | Corr Sub Del Ins Err S.Err |" of the count table (the percentage table
# labels its total row "Sum/Avg", which this deliberately does not match).
_SUM_ROW_RE = re.compile(
    r"^\s*\|\s*Sum\s*\|\s*(\d+)\s+(\d+)\s*\|\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*\|\s*$",
    re.MULTILINE,
)
# The per-utterance part of "-o all" (the pralign dump).
_SENT_SCORE_RE = re.compile(
    r"^id: \((?P<id>[^)]*)\)\s*\nScores: \(#C #S #D #I\) (\d+) (\d+) (\d+) (\d+)", re.MULTILINE
)


class ScoringInputError(ValueError):
    """Bad user input (malformed or inconsistent files, bad names); the message names the culprit."""


@dataclass(frozen=True)
class WerResult:
    """Totals of one sclite run plus the files it wrote (needed later by ``sc_stats``)."""

    name: str
    num_sentences: int
    num_words: int
    correct: int
    substitutions: int
    deletions: int
    insertions: int
    sentence_errors: int
    result_txt: Path
    sgml: Path
    ref_trn: Path
    hyp_trn: Path

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions: the WER numerator."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Word error rate in percent (``score`` guarantees ``num_words > 0``)."""
        return 100.0 * self.errors / self.num_words

    @property
    def ser(self) -> float:
        """Sentence error rate in percent: utterances with at least one error."""
        return 100.0 * self.sentence_errors / self.num_sentences

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready view including the derived rates."""
        return {
            "name": self.name,
            "num_sentences": self.num_sentences,
            "num_words": self.num_words,
            "correct": self.correct,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "errors": self.errors,
            "sentence_errors": self.sentence_errors,
            "wer": self.wer,
            "ser": self.ser,
            "result_txt": str(self.result_txt),
            "sgml": str(self.sgml),
            "ref_trn": str(self.ref_trn),
            "hyp_trn": str(self.hyp_trn),
        }


def validate_name(name: str) -> str:
    """Return ``name`` if usable as a sclite title and directory name, else raise ScoringInputError."""
    if not _NAME_RE.match(name):
        raise ScoringInputError(
            f"invalid system name {name!r}: start with a letter or digit, then use only letters, digits, "
            "'_', '.', '+' or '-'"
        )
    return name


def read_text(path: Path) -> Dict[str, List[str]]:
    """Read a Kaldi/ESPnet ``text`` file into ``{utt_id: words}`` keeping file order.

    Blank lines are skipped; a line holding only an id is an empty transcription (ESPnet writes such
    lines when the decoder outputs nothing). Duplicate ids are an error because sclite would silently
    score only one of them.
    """
    if not path.is_file():
        raise ScoringInputError(f"text file not found: {path}")
    utts: Dict[str, List[str]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            utt_id, words = fields[0], fields[1:]
            if utt_id in utts:
                raise ScoringInputError(f"{path}:{lineno}: duplicate utterance id {utt_id!r}")
            utts[utt_id] = words
    return utts


def _read_utt2spk(path: Path, ref_ids: Sequence[str]) -> Dict[str, str]:
    """Speakers for ``ref_ids`` from ``utt2spk``, or each utterance as its own speaker if absent."""
    if not path.is_file():
        return {utt: utt for utt in ref_ids}
    utt2spk: Dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ScoringInputError(f"{path}:{lineno}: expected 'utt_id speaker_id', got {line!r}")
            utt2spk[fields[0]] = fields[1]
    missing = [utt for utt in ref_ids if utt not in utt2spk]
    if missing:
        raise ScoringInputError(
            f"{path} has no speaker for {len(missing)} reference utterance(s), e.g. {missing[0]!r}"
        )
    return utt2spk


def _write_trn(path: Path, ids: Sequence[str], texts: Dict[str, List[str]], utt2spk: Dict[str, str]) -> None:
    """Write ``word ... (spk-utt)`` lines in ``ids`` order; missing ids get an empty transcription."""
    with path.open("w", encoding="utf-8") as f:
        for utt in ids:
            words = " ".join(texts.get(utt, ()))
            trn_id = f"({utt2spk[utt]}-{utt})"
            f.write(f"{words} {trn_id}\n" if words else f"{trn_id}\n")


def run_checked(cmd: Sequence[str], stdin: Optional[str] = None) -> str:
    """Run an SCTK binary, returning stdout; on failure raise RuntimeError carrying its stderr.

    SCTK tools report most problems on stdout/stderr with a non-zero exit code (and ``sc_stats`` can
    even segfault), so both streams go into the exception to make the failure diagnosable.
    """
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"{' '.join(cmd)} failed with exit code {e.returncode}\n"
            f"stderr:\n{e.stderr.strip()}\nstdout (tail):\n{e.stdout[-2000:].strip()}"
        ) from e
    return proc.stdout


def parse_totals(result_txt: str, source: Path) -> Tuple[int, int, int, int, int, int, int, int]:
    """``(#snt, #wrd, corr, sub, del, ins, err, s.err)`` from the count table of ``-o all`` output."""
    rows = _SUM_ROW_RE.findall(result_txt)
    if len(rows) != 1:
        raise RuntimeError(f"expected exactly one 'Sum' row in sclite output {source}, found {len(rows)}")
    snt, wrd, corr, sub, dele, ins, err, serr = (int(x) for x in rows[0])
    if err != sub + dele + ins:
        raise RuntimeError(f"inconsistent sclite totals in {source}: {rows[0]}")
    return snt, wrd, corr, sub, dele, ins, err, serr


def sentence_errors(result_txt: Path) -> Dict[str, int]:
    """Per-utterance error counts (S+D+I) keyed by trn id, from the alignment dump in ``result.txt``.

    This is what the pure-Python matched-pairs statistic needs; reading sclite's own per-utterance
    scores keeps it consistent with the WER totals (same alignment, same case folding).
    """
    scores: Dict[str, int] = {}
    for m in _SENT_SCORE_RE.finditer(result_txt.read_text(encoding="utf-8")):
        _, sub, dele, ins = (int(m.group(i)) for i in range(2, 6))
        scores[m.group("id")] = sub + dele + ins
    return scores


def score(ref_text: Path, hyp_text: Path, out_dir: Path, name: str = "hyp") -> WerResult:
    """Score ``hyp_text`` against ``ref_text`` with sclite, writing everything into ``out_dir``.

    Writes ``ref.trn``, ``hyp.trn``, ``result.txt`` (identical layout to asr.sh's ``score_wer``) and
    ``result.sgml`` (the alignment for ``sc_stats``). Hypothesis utterances missing from ``hyp_text``
    are scored as empty hypotheses (all deletions) with a warning, because silently dropping them
    would flatter a model that fails to decode some inputs; hypothesis ids absent from the reference
    are an error since they indicate mismatched test sets.

    Raises:
        ScoringInputError: malformed/inconsistent inputs (message names the file and id).
        espnet_compress.utils.tools.MissingToolError: sclite is not installed.
        RuntimeError: sclite failed (message includes its stderr).
    """
    ref_text, hyp_text, out_dir = Path(ref_text), Path(hyp_text), Path(out_dir)
    validate_name(name)
    sclite = require_tool("sclite", SCTK_DEBIAN_PACKAGE, extra_dirs=SCTK_BIN_DIRS)

    ref = read_text(ref_text)
    hyp = read_text(hyp_text)
    if not ref:
        raise ScoringInputError(f"reference {ref_text} contains no utterances")
    if not any(ref.values()):
        raise ScoringInputError(f"reference {ref_text} contains no words; WER is undefined")
    unknown = [utt for utt in hyp if utt not in ref]
    if unknown:
        raise ScoringInputError(
            f"{hyp_text} has {len(unknown)} utterance id(s) not in reference {ref_text}, "
            f"e.g. {unknown[0]!r}"
        )
    missing = [utt for utt in ref if utt not in hyp]
    if missing:
        logger.warning(
            "%s lacks %d of %d reference utterances (e.g. %r); scoring them as empty hypotheses",
            hyp_text, len(missing), len(ref), missing[0],
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = list(ref)
    utt2spk = _read_utt2spk(ref_text.parent / "utt2spk", ids)
    ref_trn, hyp_trn = out_dir / "ref.trn", out_dir / "hyp.trn"
    _write_trn(ref_trn, ids, ref, utt2spk)
    _write_trn(hyp_trn, ids, hyp, utt2spk)

    common = [sclite, "-r", str(ref_trn), "trn", "-h", str(hyp_trn), "trn", name, "-i", "rm"]
    result_txt = out_dir / "result.txt"
    report = run_checked(common + ["-o", "all", "stdout"])
    result_txt.write_text(report, encoding="utf-8")
    run_checked(common + ["-o", "sgml", "-O", str(out_dir), "-n", "result", "-f", "0"])
    sgml = out_dir / "result.sgml"
    if not sgml.is_file():
        raise RuntimeError(f"sclite did not write {sgml}")

    snt, wrd, corr, sub, dele, ins, _, serr = parse_totals(report, result_txt)
    if snt != len(ids):
        raise RuntimeError(f"sclite scored {snt} sentences but {ref_text} has {len(ids)}: see {result_txt}")
    result = WerResult(
        name=name,
        num_sentences=snt,
        num_words=wrd,
        correct=corr,
        substitutions=sub,
        deletions=dele,
        insertions=ins,
        sentence_errors=serr,
        result_txt=result_txt,
        sgml=sgml,
        ref_trn=ref_trn,
        hyp_trn=hyp_trn,
    )
    logger.info(
        "%s: WER %.2f%% (%d errors / %d words) -> %s", name, result.wer, result.errors, wrd, result_txt
    )
    return result
