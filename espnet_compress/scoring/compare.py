"""One table answering "how much smaller, and is it still as accurate?" for a set of compressed models.

For every system and test set the decoding output is scored with sclite (``sclite.score``) and every
non-baseline system is tested against the baseline with MAPSSWE (``significance.mapsswe``). The table
is written as Markdown for humans and JSON (every number, every file path) for scripts, both atomically
so a crash never leaves a half-written table that looks complete.

Decode speed comes from asr.sh's own measurement (stage 12 runs ESPnet's ``calculate_rtf.py`` into
``<decode_dir>/<test_set>/logdir/calculate_rtf.log``: audio seconds, decoding seconds, real-time
factor); decode dirs without it show no speed.

Layout under ``out_dir``::

    compare.md  compare.json
    <test_set>/<system>/{ref.trn,hyp.trn,result.txt,result.sgml}   # sclite
    <test_set>/<system>/mapsswe/mapsswe.stats.mapsswe                # sc_stats vs the baseline
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from espnet_compress.scoring.sclite import (
    ScoringInputError,
    WerResult,
    score,
    validate_name,
)
from espnet_compress.scoring.significance import SignificanceResult, mapsswe
from espnet_compress.utils.io import atomic_write_text
from espnet_compress.utils.params import PARAMETER_RULE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SystemSpec:
    """A decoded system: ``decode_dir/<test_set>/text`` holds its hypotheses.

    ``model_file`` gives the on-disk checkpoint size and, if ``num_params`` is None, the parameter
    count (:mod:`espnet_compress.utils.params`: counted on the model built from the ``config.yaml``
    beside the file, buffers excluded); without it both columns read "n/a".
    """

    name: str
    decode_dir: Path
    model_file: Optional[Path] = None
    num_params: Optional[int] = None


@dataclass(frozen=True)
class DecodeSpeed:
    """asr.sh's decode-speed measurement of one test set (summed over its decoding jobs)."""

    audio_seconds: float
    decode_seconds: float
    rtf: float  # decoding time / audio duration

    LOG = Path("logdir") / "calculate_rtf.log"
    _FIELDS = {"Total audio duration:": "audio_seconds", "Total decoding time:": "decode_seconds", "RTF:": "rtf"}

    @classmethod
    def from_decode_dir(cls, test_set_dir: Path) -> Optional["DecodeSpeed"]:
        """Parse ``<test_set_dir>/logdir/calculate_rtf.log``; None if asr.sh wrote none (another
        decoder) or the measurement failed (the log then lacks the numbers)."""
        log = Path(test_set_dir) / cls.LOG
        if not log.is_file():
            return None
        values: Dict[str, float] = {}
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            for prefix, key in cls._FIELDS.items():
                if line.startswith(prefix):
                    values[key] = float(line[len(prefix):].split()[0])
        return cls(**values) if len(values) == len(cls._FIELDS) else None

    def to_dict(self) -> Dict[str, float]:
        return {"audio_seconds": self.audio_seconds, "decode_seconds": self.decode_seconds, "rtf": self.rtf}


@dataclass
class SystemRow:
    """Everything the table shows for one system; ``significance`` is None for the baseline."""

    spec: SystemSpec
    num_params: Optional[int]
    checkpoint_bytes: Optional[int]
    size_ratio: Optional[float]
    wer: Dict[str, WerResult] = field(default_factory=dict)
    significance: Dict[str, Optional[SignificanceResult]] = field(default_factory=dict)
    speed: Dict[str, Optional[DecodeSpeed]] = field(default_factory=dict)


def _fmt_int(x: Optional[int]) -> str:
    return "n/a" if x is None else f"{x:,}"


def _fmt_p(p: Optional[float]) -> str:
    if p is None:
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def verdict_text(sig: Optional[SignificanceResult]) -> str:
    """Table cell: "baseline" (the row is the baseline), "lossless", or "worse/better (p=...)"."""
    if sig is None:
        return "baseline"
    if not sig.significant:
        return "lossless"
    return f"{'better' if sig.better == 'system' else 'worse'} ({_fmt_p(sig.p_value)})"


def _json_safe(obj: Any) -> Any:
    """Make floats strict-JSON: NaN -> null, +-inf -> "inf"/"-inf"; Paths -> str."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


@dataclass
class ComparisonTable:
    """The comparison of all systems against ``baseline`` on ``test_sets``."""

    baseline: str
    test_sets: List[str]
    alpha: float
    rows: List[SystemRow]

    def to_markdown(self) -> str:
        """Markdown table plus a legend explaining alpha, "lossless" and the size ratio."""
        header = ["system", "parameters", "checkpoint bytes", "size ratio"]
        for ts in self.test_sets:
            header += [f"WER {ts} (%)", f"MAPSSWE {ts}"]
        align = ["---"] + ["---:"] * 3 + ["---:", "---"] * len(self.test_sets)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        for row in self.rows:
            cells = [
                row.spec.name,
                _fmt_int(row.num_params),
                _fmt_int(row.checkpoint_bytes),
                "n/a" if row.size_ratio is None else f"{row.size_ratio:.3f}",
            ]
            for ts in self.test_sets:
                cells += [f"{row.wer[ts].wer:.2f}", verdict_text(row.significance[ts])]
            lines.append("| " + " | ".join(cells) + " |")
        legend = (
            f"MAPSSWE: NIST matched-pair sentence-segment word error test (sclite `sc_stats`), two-sided, "
            f"each system against the baseline `{self.baseline}` at alpha={self.alpha:g}. "
            "\"lossless\" means the baseline is not significantly better than the system "
            "(no significant difference); \"worse\"/\"better\" are significant differences, "
            "with their p-value. "
            "Size ratio = checkpoint bytes / baseline checkpoint bytes; "
            f"{PARAMETER_RULE}."
        )
        return "\n".join(lines) + "\n\n" + legend + "\n" + self._speed_markdown()

    def _speed_markdown(self) -> str:
        """Real-time factors measured by asr.sh, when any decode dir has them."""
        if not any(s is not None for row in self.rows for s in row.speed.values()):
            return ""
        lines = ["", "| system | " + " | ".join(f"RTF {ts}" for ts in self.test_sets) + " |",
                 "|---|" + "---:|" * len(self.test_sets)]
        for row in self.rows:
            cells = ["n/a" if row.speed[ts] is None else f"{row.speed[ts].rtf:.3f}" for ts in self.test_sets]
            lines.append(f"| {row.spec.name} | " + " | ".join(cells) + " |")
        lines += ["", "RTF: decoding time / audio duration, as asr.sh stage 12 measured it (calculate_rtf.py; "
                      "sum over its decoding jobs)."]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> Dict[str, Any]:
        """Machine-readable view with every number and file path (strict-JSON safe)."""
        systems = []
        for row in self.rows:
            systems.append(
                {
                    "name": row.spec.name,
                    "decode_dir": row.spec.decode_dir,
                    "model_file": row.spec.model_file,
                    "num_params": row.num_params,
                    "checkpoint_bytes": row.checkpoint_bytes,
                    "size_ratio": row.size_ratio,
                    "is_baseline": row.spec.name == self.baseline,
                    "test_sets": {
                        ts: {
                            "wer": row.wer[ts].to_dict(),
                            "verdict": verdict_text(row.significance[ts]),
                            "significance": None
                            if row.significance[ts] is None
                            else row.significance[ts].to_dict(),
                            "speed": None if row.speed[ts] is None else row.speed[ts].to_dict(),
                        }
                        for ts in self.test_sets
                    },
                }
            )
        return _json_safe(
            {"baseline": self.baseline, "alpha": self.alpha, "test_sets": self.test_sets, "systems": systems}
        )


def _validate(systems: Sequence[SystemSpec], baseline: str, ref_dir: Path, test_sets: Sequence[str]) -> None:
    """Fail before any scoring with one message listing every problem with the inputs."""
    problems: List[str] = []
    names = [s.name for s in systems]
    for name in names:
        try:
            validate_name(name)
        except ScoringInputError as e:
            problems.append(str(e))
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        problems.append(f"duplicate system name(s): {', '.join(dups)}")
    if baseline not in names:
        problems.append(f"baseline {baseline!r} is not one of the systems ({', '.join(names) or 'none'})")
    if not test_sets:
        problems.append("no test sets given")
    if len(set(test_sets)) != len(test_sets):
        problems.append("duplicate test set names")
    for ts in test_sets:
        if not (ref_dir / ts / "text").is_file():
            problems.append(f"reference text not found: {ref_dir / ts / 'text'}")
    for s in systems:
        if not Path(s.decode_dir).is_dir():
            problems.append(f"decode dir of system {s.name!r} not found: {s.decode_dir}")
        else:
            for ts in test_sets:
                if not (Path(s.decode_dir) / ts / "text").is_file():
                    hyp = Path(s.decode_dir) / ts / "text"
                    problems.append(f"hypothesis text of system {s.name!r} not found: {hyp}")
        if s.model_file is not None and not Path(s.model_file).is_file():
            problems.append(f"model file of system {s.name!r} not found: {s.model_file}")
        elif s.model_file is not None and s.num_params is None and not (Path(s.model_file).parent / "config.yaml").is_file():
            problems.append(f"model file of system {s.name!r} has no config.yaml beside it (parameters are counted "
                            f"on the model its training config builds): {s.model_file}")
        if s.num_params is not None and s.num_params < 0:
            problems.append(f"negative parameter count for system {s.name!r}")
    if problems:
        raise ScoringInputError("; ".join(problems))


def compare(
    systems: Sequence[SystemSpec],
    baseline: str,
    ref_dir: Path,
    test_sets: Sequence[str],
    out_dir: Path,
    alpha: float = 0.05,
) -> ComparisonTable:
    """Score ``systems`` on ``test_sets`` (refs ``ref_dir/<test_set>/text``), test each vs ``baseline``.

    Writes ``out_dir/compare.md`` and ``out_dir/compare.json`` and returns the table (rows in the
    order given). Raises ScoringInputError for bad inputs before doing any work.
    """
    ref_dir, out_dir = Path(ref_dir), Path(out_dir)
    test_sets = list(test_sets)
    _validate(systems, baseline, ref_dir, test_sets)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows: List[SystemRow] = []
    for spec in systems:
        model_file = None if spec.model_file is None else Path(spec.model_file)
        num_params = spec.num_params
        if num_params is None and model_file is not None:
            from espnet_compress.utils.params import count_file_parameters  # torch only when needed

            num_params = count_file_parameters(model_file)
        ckpt_bytes = None if model_file is None else model_file.stat().st_size
        row = SystemRow(spec=spec, num_params=num_params, checkpoint_bytes=ckpt_bytes, size_ratio=None)
        for ts in test_sets:
            hyp_text = Path(spec.decode_dir) / ts / "text"
            row.wer[ts] = score(ref_dir / ts / "text", hyp_text, out_dir / ts / spec.name, name=spec.name)
            row.speed[ts] = DecodeSpeed.from_decode_dir(Path(spec.decode_dir) / ts)
        rows.append(row)

    base_row = next(r for r in rows if r.spec.name == baseline)
    for row in rows:
        if base_row.checkpoint_bytes and row.checkpoint_bytes is not None:
            row.size_ratio = row.checkpoint_bytes / base_row.checkpoint_bytes
        for ts in test_sets:
            if row is base_row:
                row.significance[ts] = None
            else:
                row.significance[ts] = mapsswe(
                    base_row.wer[ts], row.wer[ts], out_dir / ts / row.spec.name / "mapsswe", alpha=alpha
                )

    table = ComparisonTable(baseline=baseline, test_sets=test_sets, alpha=alpha, rows=rows)
    atomic_write_text(out_dir / "compare.md", table.to_markdown())
    atomic_write_text(out_dir / "compare.json", json.dumps(table.to_dict(), indent=2, allow_nan=False) + "\n")
    logger.info("wrote %s and %s", out_dir / "compare.md", out_dir / "compare.json")
    return table
