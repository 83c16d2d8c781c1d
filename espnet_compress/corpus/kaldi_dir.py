"""Writing and validating Kaldi-style data directories.

ESPnet's data preparation (``utils/fix_data_dir.sh``, ``spk2utt`` handling,
``sclite`` scoring) silently drops or mis-aligns utterances when a data
directory is unsorted, has mismatched id sets, or utterance ids that do not
start with their speaker id.  Validating eagerly, with an error that names
the file and the first offending line, turns those late, confusing failures
into an immediate and actionable one.

Sorting follows ``LC_ALL=C`` byte order.  Python compares ``str`` by code
point, which coincides with the byte order of the UTF-8 encoding, so plain
string comparison is exact here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

PathLike = Union[str, Path]

REQUIRED_FILES = ("wav.scp", "text", "utt2spk")
#: The subsets a corpus for the main job and the benchmarks consists of (train, early stopping, test).
CORPUS_SUBSETS = ("train", "dev", "test")

# ``foo.ark:1234`` entries point into an archive; the archive is what must exist.
_ARK_OFFSET = re.compile(r"^(?P<ark>.+\.ark):\d+$")


class DataDirError(ValueError):
    """A Kaldi data directory is malformed; the message names file and line."""


@dataclass(frozen=True)
class SampleRate:
    """The sample rate the audio must have, and where that requirement comes from.

    ``source`` is quoted in errors (e.g. ``"frontend_conf.fs in conf/train.yaml"``) so that a
    mismatch says which setting to change, not just that two numbers differ.
    """

    hz: int
    source: str


@dataclass(frozen=True)
class TableRow:
    """One ``key value`` line of a Kaldi table file, kept with its line number."""

    line_no: int
    key: str
    value: str


def write_kaldi_dir(path: PathLike, entries: Iterable[tuple[str, str, str, str]]) -> int:
    """Write ``wav.scp``, ``text``, ``utt2spk`` and ``spk2utt`` into ``path``.

    ``entries`` are ``(utt_id, spk_id, wav_path, text)`` tuples in any order;
    they are sorted here so that callers cannot produce an unsorted directory.
    Returns the number of utterances written.
    """
    rows = sorted(entries)
    _check_entries(rows)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _write_lines(out / "wav.scp", [f"{utt} {wav}" for utt, _, wav, _ in rows])
    _write_lines(out / "text", [f"{utt} {text}" for utt, _, _, text in rows])
    _write_lines(out / "utt2spk", [f"{utt} {spk}" for utt, spk, _, _ in rows])
    spk2utt: dict[str, list[str]] = {}
    for utt, spk, _, _ in rows:
        spk2utt.setdefault(spk, []).append(utt)
    _write_lines(out / "spk2utt", [f"{spk} {' '.join(utts)}" for spk, utts in sorted(spk2utt.items())])
    return len(rows)


def validate_corpus_dir(path: PathLike, sample_rate: Optional[SampleRate] = None,
                        subsets: Sequence[str] = CORPUS_SUBSETS) -> Dict[str, int]:
    """Check a corpus root holding one Kaldi data dir per subset; return utterances per subset.

    Every subset is checked with :func:`validate_data_dir` (audio headers included when
    ``sample_rate`` is given). All missing subsets are named at once: a user assembling a corpus
    by hand learns the whole layout from one error, not one directory per attempt.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataDirError(f"{root}: not a directory (expected a corpus with subsets {', '.join(subsets)})")
    missing = [name for name in subsets if not (root / name).is_dir()]
    if missing:
        raise DataDirError(
            f"{root}: missing subset(s) {', '.join(repr(m) for m in missing)}; a corpus needs "
            f"{', '.join(subsets)}, each a Kaldi data dir with {', '.join(REQUIRED_FILES)}"
        )
    counts = {name: validate_data_dir(root / name, sample_rate) for name in subsets}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DataDirError(f"{root / empty[0]}: no utterances (every subset of a corpus needs some)")
    return counts


def validate_data_dir(path: PathLike, sample_rate: Optional[SampleRate] = None) -> int:
    """Check a Kaldi data directory and return its number of utterances.

    Raises :class:`DataDirError` naming the offending file and the first bad
    line or id.  Checks: required files exist; every file is sorted with
    unique ids; ``wav.scp``, ``text`` and ``utt2spk`` cover the same ids;
    transcripts are non-empty; plain wav paths exist (piped commands ending
    in ``|`` are not run); utterance ids start with their speaker id; and, if
    present, ``spk2utt`` is exactly the inverse of ``utt2spk``.  With
    ``sample_rate``, every plain audio file's header is read as well: it must
    be a sound file, mono, at that rate (training would otherwise fail in the
    data loader mid-epoch, or worse, run the front end on the wrong rate).
    """
    data_dir = Path(path)
    if not data_dir.is_dir():
        raise DataDirError(f"{data_dir}: not a directory")
    for name in REQUIRED_FILES:
        if not (data_dir / name).is_file():
            raise DataDirError(f"{data_dir / name}: missing (required: {', '.join(REQUIRED_FILES)})")

    wav_scp = read_table(data_dir / "wav.scp")
    text = read_table(data_dir / "text")
    utt2spk = read_table(data_dir / "utt2spk")
    _check_same_ids(data_dir / "text", text, data_dir / "wav.scp", wav_scp)
    _check_same_ids(data_dir / "utt2spk", utt2spk, data_dir / "wav.scp", wav_scp)
    _check_transcripts(data_dir / "text", text)
    _check_wav_paths(data_dir / "wav.scp", wav_scp, sample_rate)
    _check_speaker_prefixes(data_dir / "utt2spk", utt2spk)
    if (data_dir / "spk2utt").exists():
        _check_spk2utt(data_dir / "spk2utt", read_table(data_dir / "spk2utt"), utt2spk)
    return len(wav_scp)


def _check_entries(rows: list[tuple[str, str, str, str]]) -> None:
    """Reject entries that would produce a directory failing validation."""
    seen: set[str] = set()
    for utt, spk, wav, text in rows:
        for kind, value in (("utterance id", utt), ("speaker id", spk), ("wav path", wav)):
            if not value or any(c.isspace() for c in value):
                raise ValueError(f"{kind} {value!r} of utterance {utt!r} is empty or contains whitespace")
        if utt in seen:
            raise ValueError(f"duplicate utterance id {utt!r}")
        seen.add(utt)
        if not utt.startswith(spk):
            raise ValueError(f"utterance id {utt!r} does not start with its speaker id {spk!r}")
        if not text.strip() or "\n" in text:
            raise ValueError(f"transcript of {utt!r} is empty or spans several lines: {text!r}")


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write newline-terminated lines as UTF-8 (never platform-default encoding)."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_table(path: Path) -> list[TableRow]:
    """Parse a ``key value`` table, enforcing sorted, unique, well-formed keys."""
    rows: list[TableRow] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line or line[0].isspace():
                raise DataDirError(f"{path}: line {line_no} is empty or starts with whitespace")
            key, _, value = line.partition(" ")
            row = TableRow(line_no, key, value.strip())
            if rows and row.key <= rows[-1].key:
                _raise_order_error(path, row, rows[-1])
            rows.append(row)
    return rows


def _raise_order_error(path: Path, row: TableRow, previous: TableRow) -> None:
    """Explain a duplicate or out-of-order key and how to fix it."""
    if row.key == previous.key:
        raise DataDirError(
            f"{path}: duplicate id {row.key!r} at line {row.line_no} (first at line {previous.line_no})"
        )
    raise DataDirError(
        f"{path}: not sorted at line {row.line_no} ({row.key!r} after {previous.key!r}); "
        f"run `LC_ALL=C sort -o {path} {path}`"
    )


def _check_same_ids(path: Path, rows: list[TableRow], ref_path: Path, ref_rows: list[TableRow]) -> None:
    """Require ``rows`` to have exactly the ids of ``ref_rows``; report the first difference."""
    ids = {row.key for row in rows}
    ref_ids = {row.key for row in ref_rows}
    extra = sorted(ids - ref_ids)
    missing = sorted(ref_ids - ids)
    if extra:
        raise DataDirError(f"{path}: utterance {extra[0]!r} is not in {ref_path.name}")
    if missing:
        raise DataDirError(f"{path}: missing utterance {missing[0]!r}, which is in {ref_path.name}")


def _check_transcripts(path: Path, rows: list[TableRow]) -> None:
    """Empty references make WER undefined and break token-list building."""
    for row in rows:
        if not row.value:
            raise DataDirError(f"{path}: empty transcript for {row.key!r} at line {row.line_no}")


def _check_wav_paths(path: Path, rows: list[TableRow], sample_rate: Optional[SampleRate] = None) -> None:
    """Check that referenced audio exists (and, with ``sample_rate``, its header); piped commands
    are not executed and archive entries (``x.ark:offset``) are only checked for existence."""
    for row in rows:
        if row.value.endswith("|"):
            continue
        ark = _ARK_OFFSET.match(row.value)
        audio = Path(ark.group("ark") if ark else row.value)
        if not audio.is_file():
            raise DataDirError(f"{path}: audio for {row.key!r} not found at line {row.line_no}: {row.value}")
        if sample_rate is not None and not ark:
            _check_audio_header(path, row, audio, sample_rate)


def _check_audio_header(path: Path, row: TableRow, audio: Path, sample_rate: SampleRate) -> None:
    """ESPnet's ``sound`` reader (soundfile) must read the file as mono audio at the config's rate."""
    import soundfile  # only here: the rest of this module needs nothing beyond the standard library

    where = f"{path}: audio for {row.key!r} at line {row.line_no} ({audio})"
    try:
        info = soundfile.info(str(audio))
    except RuntimeError as err:  # soundfile's LibsndfileError: "Format not recognised", empty file, ...
        raise DataDirError(f"{where} is not a readable audio file: {err}") from None
    if info.channels != 1:
        raise DataDirError(f"{where} has {info.channels} channels; the ASR front end takes mono audio")
    if info.samplerate != sample_rate.hz:
        raise DataDirError(
            f"{where} is {info.samplerate} Hz, but {sample_rate.source} is {sample_rate.hz} Hz; "
            f"resample the corpus (e.g. `sox in.wav -r {sample_rate.hz} out.wav`) or train with a config for "
            f"{info.samplerate} Hz"
        )


def _check_speaker_prefixes(path: Path, rows: list[TableRow]) -> None:
    """Kaldi needs utt ids prefixed by speaker ids so one sort orders both."""
    previous_spk = ""
    for row in rows:
        if not row.value or " " in row.value:
            raise DataDirError(f"{path}: line {row.line_no} must be '<utt-id> <speaker-id>'")
        if not row.key.startswith(row.value):
            raise DataDirError(
                f"{path}: utterance id {row.key!r} does not start with its speaker id "
                f"{row.value!r} (line {row.line_no})"
            )
        if row.value < previous_spk:
            raise DataDirError(
                f"{path}: speaker ids not sorted along utterance ids at line {row.line_no} "
                f"({row.value!r} after {previous_spk!r}); spk2utt would be inconsistent"
            )
        previous_spk = row.value


def _check_spk2utt(path: Path, rows: list[TableRow], utt2spk: list[TableRow]) -> None:
    """``spk2utt`` must be the exact inverse of ``utt2spk`` (same utterance order)."""
    expected: dict[str, list[str]] = {}
    for row in utt2spk:
        expected.setdefault(row.value, []).append(row.key)
    for row in rows:
        utts = row.value.split()
        if expected.get(row.key) != utts:
            raise DataDirError(
                f"{path}: speaker {row.key!r} at line {row.line_no} does not match utt2spk; "
                f"regenerate it with `utils/utt2spk_to_spk2utt.pl utt2spk > spk2utt`"
            )
    missing = sorted(set(expected) - {row.key for row in rows})
    if missing:
        raise DataDirError(f"{path}: missing speaker {missing[0]!r}, which is in utt2spk")
