"""Tests for the synthetic spoken_commands corpus and Kaldi data-dir handling.

Corpora here are tiny (18 utterances) so the whole file runs in seconds; the
real espeak-ng and sox are used because determinism and audio format are
properties of the actual tool chain, not of a mock.
"""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from espnet_compress.bin import make_corpus, validate_data
from espnet_compress.corpus import (
    VOCABULARY,
    DataDirError,
    add_noise,
    generate_corpus,
    plan_split,
    render_utterance,
    split_voices,
    validate_data_dir,
    write_kaldi_dir,
)
from espnet_compress.corpus.spoken_commands import (
    ACCENTS,
    MAX_WORDS,
    MIN_WORDS,
    SNR_DB_RANGE,
    SPLITS,
    all_voices,
    find_tools,
    synthesize_speech,
)
from espnet_compress.utils.tools import MissingToolError, require_tool

SMALL = {"num_train": 8, "num_dev": 4, "num_test": 6}
KALDI_FILES = ("text", "utt2spk", "spk2utt")


def _small_args(out: Path, seed: int, nj: int) -> list[str]:
    args = ["--out_dir", str(out), "--seed", str(seed), "--nj", str(nj), "--no_progress"]
    for key, value in SMALL.items():
        args += [f"--{key}", str(value)]
    return args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus built through the CLI with two workers."""
    out = tmp_path_factory.mktemp("corpus") / "out"
    assert make_corpus.main(_small_args(out, seed=0, nj=2)) == 0
    return out


def _read_table(path: Path) -> dict[str, str]:
    rows = (line.rstrip("\n").partition(" ") for line in path.open(encoding="utf-8"))
    return {key: value for key, _, value in rows}


def _tree_bytes(out: Path) -> dict[str, bytes]:
    """All wav and Kaldi files except wav.scp (which holds absolute paths)."""
    files = [*out.glob("wav/*/*.wav"), *(out / s / f for s in SPLITS for f in KALDI_FILES)]
    return {str(path.relative_to(out)): path.read_bytes() for path in files}


# --- determinism -------------------------------------------------------------


def test_same_seed_is_byte_identical_regardless_of_nj(corpus: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert make_corpus.main(_small_args(again, seed=0, nj=1)) == 0
    first, second = _tree_bytes(corpus), _tree_bytes(again)
    assert len(first) == sum(SMALL.values()) + 3 * len(KALDI_FILES)
    assert first == second


def test_different_seed_differs(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_corpus(other, seed=1, nj=2, progress=False, **SMALL)
    assert _read_table(corpus / "train" / "text") != _read_table(other / "train" / "text")
    assert split_voices(0) != split_voices(1)


# --- format ------------------------------------------------------------------


def test_generated_dirs_are_valid_kaldi_dirs(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split in SPLITS:
        assert validate_data_dir(corpus / split) == SMALL[f"num_{split}"]
        for path in _read_table(corpus / split / "wav.scp").values():
            assert Path(path).is_absolute() and Path(path).parent == corpus / "wav" / split
    assert validate_data.main([str(corpus / s) for s in SPLITS]) == 0
    assert "OK" in capsys.readouterr().out


def test_ids_are_ascii_and_prefixed_by_speaker(corpus: Path) -> None:
    for split in SPLITS:
        for utt, spk in _read_table(corpus / split / "utt2spk").items():
            assert utt.isascii() and " " not in utt
            assert utt.startswith(f"{spk}-{split}-")


def test_wav_files_are_16k_mono_16bit_and_not_silent(corpus: Path) -> None:
    wavs = sorted(corpus.glob("wav/*/*.wav"))
    assert len(wavs) == sum(SMALL.values())
    for path in wavs:
        with wave.open(str(path), "rb") as handle:
            assert (handle.getframerate(), handle.getnchannels(), handle.getsampwidth()) == (16000, 1, 2)
            samples = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2").astype(np.float64)
        assert samples.size > 0.3 * 16000, path
        assert np.sqrt(np.mean(samples**2)) > 300, f"{path} is (nearly) silent"


def test_transcripts_use_vocabulary_and_lengths(corpus: Path) -> None:
    for split in SPLITS:
        for text in _read_table(corpus / split / "text").values():
            words = text.split(" ")
            assert text == text.upper() and MIN_WORDS <= len(words) <= MAX_WORDS
            assert set(words) <= set(VOCABULARY)
    lengths = {len(spec.words) for spec in plan_split("train", 400, seed=0)}
    assert lengths == set(range(MIN_WORDS, MAX_WORDS + 1))
    assert len(VOCABULARY) == len(set(VOCABULARY)) >= 30


# --- speaker split -----------------------------------------------------------


def test_generated_speakers_are_disjoint(corpus: Path) -> None:
    speakers = {s: set(_read_table(corpus / s / "spk2utt")) for s in SPLITS}
    assert not speakers["test"] & speakers["train"]
    assert not speakers["dev"] & speakers["train"]
    assert not speakers["dev"] & speakers["test"]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_voice_split_partitions_voices_and_covers_test_conditions(seed: int) -> None:
    split = split_voices(seed)
    ids = {name: {v.speaker_id for v in voices} for name, voices in split.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["dev"] and not ids["dev"] & ids["test"]
    assert set().union(*ids.values()) == {v.speaker_id for v in all_voices()}
    for held_out in ("test", "dev"):
        assert {v.sex for v in split[held_out]} == {"m", "f"}
    assert {v.accent for v in split["test"]} == set(ACCENTS)
    assert split_voices(seed) == split


# --- noise -------------------------------------------------------------------


@pytest.mark.parametrize("color", ["white", "pink"])
@pytest.mark.parametrize("snr_db", [15.0, 22.5, 30.0])
def test_add_noise_hits_requested_snr(color: str, snr_db: float) -> None:
    t = np.arange(16000) / 16000
    signal = 0.1 * np.sin(2 * np.pi * 220 * t) * (t > 0.3)
    noisy = add_noise(signal, snr_db, np.random.default_rng(0), color)
    measured = 10 * np.log10(np.sum(signal**2) / np.sum((noisy - signal) ** 2))
    assert measured == pytest.approx(snr_db, abs=1e-9)
    again = add_noise(signal, snr_db, np.random.default_rng(0), color)
    assert np.array_equal(noisy, again)


def test_add_noise_rejects_unknown_color() -> None:
    with pytest.raises(ValueError, match="noise color"):
        add_noise(np.ones(10), 20.0, np.random.default_rng(0), "brown")


def test_rendered_audio_snr_is_at_least_15_db() -> None:
    tools = find_tools()
    specs = plan_split("test", 3, seed=0)
    for spec in specs:
        assert SNR_DB_RANGE[0] <= spec.snr_db <= SNR_DB_RANGE[1]
        speech = synthesize_speech(spec, tools)
        mixture = render_utterance(spec, tools).astype(np.float64) / 32767.0
        scale = np.dot(mixture, speech) / np.dot(speech, speech)  # undo peak limiting, if any
        noise = mixture - scale * speech
        measured = 10 * np.log10(np.sum((scale * speech) ** 2) / np.sum(noise**2))
        assert measured >= SNR_DB_RANGE[0] - 0.01
        assert measured == pytest.approx(spec.snr_db, abs=0.1)


# --- idempotence and atomicity -----------------------------------------------


def test_rerun_reuses_valid_splits_and_repairs_broken_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate_corpus(out, seed=3, nj=1, progress=False, **SMALL)
    before = _tree_bytes(out)
    (out / ".tmp-train-stale").mkdir()  # left behind by a killed run
    text = out / "dev" / "text"
    text.write_text("".join(text.read_text().splitlines(keepends=True)[1:]))  # corrupt dev

    reports = generate_corpus(out, seed=3, nj=1, progress=False, **SMALL)

    assert {r.name: r.reused for r in reports} == {"train": True, "dev": False, "test": True}
    assert _tree_bytes(out) == before
    assert not list(out.glob(".tmp-*"))
    forced = generate_corpus(out, seed=3, nj=1, progress=False, force=True, **SMALL)
    assert not any(r.reused for r in forced)


# --- validation errors -------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A valid three-utterance data dir with (empty) wav files."""
    entries = []
    for utt, spk, text in [("a-1", "a", "GO"), ("a-2", "a", "STOP NOW"), ("b-1", "b", "ONE")]:
        wav = tmp_path / f"{utt}.wav"
        wav.touch()
        entries.append((utt, spk, str(wav), text))
    path = tmp_path / "data"
    assert write_kaldi_dir(path, reversed(entries)) == 3
    assert validate_data_dir(path) == 3
    return path


def _expect_error(data_dir: Path, file_name: str, *fragments: str) -> None:
    with pytest.raises(DataDirError) as info:
        validate_data_dir(data_dir)
    message = str(info.value)
    assert str(data_dir / file_name) in message
    for fragment in fragments:
        assert fragment in message


def test_unsorted_file_is_reported_with_line(data_dir: Path) -> None:
    text = data_dir / "text"
    lines = text.read_text().splitlines(keepends=True)
    text.write_text(lines[2] + lines[0] + lines[1])
    _expect_error(data_dir, "text", "not sorted at line 2", "'a-1' after 'b-1'", "LC_ALL=C sort")


def test_duplicate_id_is_reported(data_dir: Path) -> None:
    utt2spk = data_dir / "utt2spk"
    utt2spk.write_text("a-1 a\n" + utt2spk.read_text())
    _expect_error(data_dir, "utt2spk", "duplicate id 'a-1'")


def test_mismatched_ids_are_reported(data_dir: Path) -> None:
    text = data_dir / "text"
    text.write_text(text.read_text().replace("a-2 ", "a-3 "))
    _expect_error(data_dir, "text", "'a-3'", "not in wav.scp")


def test_missing_file_is_reported(data_dir: Path) -> None:
    (data_dir / "utt2spk").unlink()
    _expect_error(data_dir, "utt2spk", "missing")


def test_empty_transcript_is_reported(data_dir: Path) -> None:
    text = data_dir / "text"
    text.write_text(text.read_text().replace("a-2 STOP NOW", "a-2"))
    _expect_error(data_dir, "text", "empty transcript for 'a-2'")


def test_missing_wav_is_reported_but_pipes_are_skipped(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "b-1.wav").unlink()
    _expect_error(data_dir, "wav.scp", "'b-1'")
    wav_scp = data_dir / "wav.scp"
    lines = wav_scp.read_text().splitlines()
    wav_scp.write_text("\n".join(lines[:2] + ["b-1 sox in.flac -t wav - |"]) + "\n")
    assert validate_data_dir(data_dir) == 3


def test_speaker_prefix_and_spk2utt_consistency(data_dir: Path) -> None:
    spk2utt = data_dir / "spk2utt"
    spk2utt.write_text("a a-1\nb b-1\n")
    _expect_error(data_dir, "spk2utt", "'a'")
    spk2utt.unlink()
    utt2spk = data_dir / "utt2spk"
    utt2spk.write_text(utt2spk.read_text().replace("b-1 b", "b-1 c"))
    _expect_error(data_dir, "utt2spk", "does not start with its speaker id 'c'")


def test_validate_cli_exits_1_with_message(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (data_dir / "text").unlink()
    assert validate_data.main([str(data_dir)]) == 1
    assert str(data_dir / "text") in capsys.readouterr().err


def test_writer_rejects_ids_without_speaker_prefix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="speaker id"):
        write_kaldi_dir(tmp_path / "d", [("x-1", "y", "/a.wav", "GO")])


# --- missing tools -----------------------------------------------------------


def test_missing_tool_names_package_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError, match=r"espeak-ng not found.*`apt-get install espeak-ng`"):
        require_tool("espeak-ng", "espeak-ng")
    out = tmp_path / "out"
    with pytest.raises(MissingToolError, match="apt-get install"):
        generate_corpus(out, nj=1, progress=False, **SMALL)
    assert not out.exists()
    assert make_corpus.main(_small_args(out, seed=0, nj=1)) == 1


def test_require_tool_searches_extra_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    tool = tmp_path / "bin" / "sclite"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert require_tool("sclite", "sctk", extra_dirs=[str(tool.parent)]) == str(tool)
    with pytest.raises(MissingToolError, match=str(tmp_path / "elsewhere")):
        require_tool("sclite", "sctk", extra_dirs=[str(tmp_path / "elsewhere")])


def test_exclusive_lock_makes_a_second_holder_wait(tmp_path: Path) -> None:
    """Benchmarks started side by side on one exp dir prepare its token list and stats under this
    lock; a second holder (another open file description, as another process has) must not get it
    while the first holds it, and must get it afterwards."""
    import fcntl

    from espnet_compress.utils.io import exclusive

    lock = tmp_path / "sub" / ".prepare.lock"
    with exclusive(lock):
        with open(lock, "a") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
