"""The "spoken_commands" corpus: tiny, fully synthetic, reproducible ASR data.

Why it exists: the compression experiments need a speech corpus that can be
rebuilt offline in about a minute on two CPU cores, byte for byte, on any
machine with Debian's ``espeak-ng`` and ``sox``.  Real corpora are too big
and cannot be redistributed; a synthetic one with a closed vocabulary still
exercises the whole ESPnet recipe (feature extraction, tokenisation,
training, decoding, sclite scoring) and gives meaningful, quickly
converging WERs.

Content
    Utterances are 1..8 words (length drawn uniformly) from a 35-word
    vocabulary: the digits ZERO..NINE plus 25 acoustically distinct command
    words.  Transcripts are upper case with single spaces.

Voices
    A voice (= speaker) is an espeak-ng English accent combined with a voice
    variant: 8 accents x (8 male + 8 female variants) = 128 voices.  Speaker
    ids look like ``en-gb-scotland_f3``; utterance ids are
    ``<speaker>-<split>-<index:06d>`` so that they sort with their speaker.
    Per utterance the speaking rate (espeak ``-s``), pitch (``-p``), sox
    tempo, a small gain and additive white or pink noise at an SNR drawn
    from [15, 30] dB are randomised.  Audio is 16 kHz mono 16-bit PCM.

Splits (speaker-disjoint)
    The voice split depends only on the seed.  For every accent, the
    variants of each sex are shuffled; the first male and the first female
    variant become *test* voices (so test covers all 8 accents and both
    sexes, 16 voices), the second variant of one sex (male for even, female
    for odd accent index in sorted order) becomes a *dev* voice (8 voices,
    4 per sex), and the remaining 104 voices are *train* voices.  No test or
    dev voice ever occurs in train.  Utterances cycle through a seeded
    permutation of their split's voices, so speakers are balanced.

Determinism
    Every random choice of utterance ``i`` in split ``s`` comes from a numpy
    generator seeded with ``(seed, s, i)``, and the tools are run with fixed
    arguments (sox writes float samples, so no dither).  Output therefore
    does not depend on ``nj`` or process scheduling: the same seed gives
    byte-identical wav and text files (for the same espeak-ng/sox versions;
    this was built against Debian's espeak-ng 1.51 and sox 14.4.2).

Layout and atomicity
    ``OUT/{train,dev,test}`` are Kaldi data dirs whose ``wav.scp`` holds
    absolute paths to ``OUT/wav/<split>/<utt>.wav``.  Each split is built in
    a hidden ``OUT/.tmp-<split>-*`` directory and renamed into place, the
    data dir last, so the data dir doubles as the "split complete" marker.
    ``OUT/corpus.json`` records the corpus version, seed and per-split
    counts; a split whose record matches and whose data dir validates is
    reused, which makes reruns fast.  Concurrent runs on one ``OUT`` are not
    supported (stale ``.tmp-*`` dirs are deleted at start).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from espnet_compress.corpus.kaldi_dir import (
    DataDirError,
    validate_data_dir,
    write_kaldi_dir,
)
from espnet_compress.utils.tools import require_tool

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# Bump whenever generation changes in a way that alters the output, so that
# existing corpora are regenerated instead of silently reused.
CORPUS_VERSION = 1
SAMPLE_RATE = 16000

DIGITS = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")
COMMANDS = (
    "GO", "STOP", "LEFT", "RIGHT", "UP", "DOWN", "YES", "NO", "ON", "OFF",
    "OPEN", "CLOSE", "START", "PLAY", "PAUSE", "NEXT", "BACK", "FORWARD",
    "LOUDER", "QUIETER", "LIGHTS", "MUSIC", "CALL", "HOME", "CANCEL",
)  # fmt: skip
VOCABULARY = DIGITS + COMMANDS
MIN_WORDS, MAX_WORDS = 1, 8

# espeak-ng's own (non-mbrola) English accents.
ACCENTS = (
    "en-029", "en-gb", "en-gb-scotland", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "en-gb-x-rp", "en-us", "en-us-nyc",
)  # fmt: skip
# Natural-sounding variants only: whisper/robot/croak voices would make the
# task about voice effects rather than speech.
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5", "belinda", "linda", "steph")

SPLITS = ("train", "dev", "test")
DEFAULT_COUNTS = {"train": 2000, "dev": 150, "test": 300}

SNR_DB_RANGE = (15.0, 30.0)
GAIN_DB_RANGE = (-9.0, -3.0)  # espeak peaks near full scale; leave headroom for noise
ESPEAK_RATE_RANGE = (140, 200)  # words per minute; espeak default is 175
ESPEAK_PITCH_RANGE = (25, 75)  # 0..99; espeak default is 50
TEMPO_RANGE = (0.85, 1.15)
NOISE_COLORS = ("white", "pink")
_PEAK_LIMIT = 0.98

# Distinct first elements keep the seeded random streams independent.
_STREAM_VOICE_SPLIT, _STREAM_VOICE_ORDER, _STREAM_UTTERANCE = 0, 1, 2
_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
_MANIFEST = "corpus.json"


@dataclass(frozen=True)
class Voice:
    """An espeak-ng accent plus voice variant; one voice is one speaker."""

    accent: str
    variant: str
    sex: str  # "m" or "f"

    @property
    def speaker_id(self) -> str:
        return f"{self.accent}_{self.variant}"

    @property
    def espeak_name(self) -> str:
        return f"{self.accent}+{self.variant}"


@dataclass(frozen=True)
class UtteranceSpec:
    """Everything needed to render one utterance, so workers need no shared state."""

    utt_id: str
    voice: Voice
    words: tuple[str, ...]
    espeak_rate: int
    espeak_pitch: int
    tempo: float
    gain_db: float
    snr_db: float
    noise_color: str
    noise_seed: int

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass(frozen=True)
class Tools:
    """Resolved paths of the external programs."""

    espeak: str
    sox: str


@dataclass(frozen=True)
class SplitReport:
    """Outcome of building one split, for the CLI summary."""

    name: str
    data_dir: Path
    num_utterances: int
    num_speakers: int
    reused: bool


def find_tools() -> Tools:
    """Locate espeak-ng and sox, raising MissingToolError with install hints."""
    return Tools(espeak=require_tool("espeak-ng", "espeak-ng"), sox=require_tool("sox", "sox"))


def check_voices_available(tools: Tools) -> None:
    """Fail if an accent or variant is unknown to the installed espeak-ng.

    espeak-ng silently falls back to its default voice for unknown names,
    which would quietly merge "different" speakers into one.
    """
    accents = set(re.findall(r"^\s*\d+\s+(\S+)", _run([tools.espeak, "--voices=en"]).decode(), re.M))
    variants = set(re.findall(r"!v/(\S+)", _run([tools.espeak, "--voices=variant"]).decode()))
    missing = sorted(set(ACCENTS) - accents) + sorted(set(MALE_VARIANTS + FEMALE_VARIANTS) - variants)
    if missing:
        raise RuntimeError(f"espeak-ng lacks voices {missing}; install Debian's espeak-ng-data package")


def all_voices() -> list[Voice]:
    """Every (accent, variant) combination, in a fixed order."""
    return [
        Voice(accent, variant, sex)
        for accent in ACCENTS
        for sex, variants in (("m", MALE_VARIANTS), ("f", FEMALE_VARIANTS))
        for variant in variants
    ]


def split_voices(seed: int) -> dict[str, list[Voice]]:
    """Assign every voice to exactly one split (see module docstring)."""
    rng = np.random.default_rng([seed, _STREAM_VOICE_SPLIT])
    split: dict[str, list[Voice]] = {name: [] for name in SPLITS}
    for accent_index, accent in enumerate(ACCENTS):
        male = [Voice(accent, v, "m") for v in rng.permutation(MALE_VARIANTS)]
        female = [Voice(accent, v, "f") for v in rng.permutation(FEMALE_VARIANTS)]
        split["test"] += [male[0], female[0]]
        dev_sex, other = (male, female) if accent_index % 2 == 0 else (female, male)
        split["dev"].append(dev_sex[1])
        split["train"] += dev_sex[2:] + other[1:]
    return {name: sorted(voices, key=lambda v: v.speaker_id) for name, voices in split.items()}


def plan_split(split: str, num_utterances: int, seed: int) -> list[UtteranceSpec]:
    """Draw the deterministic recipe of every utterance of ``split``."""
    voices = split_voices(seed)[split]
    order = np.random.default_rng([seed, _STREAM_VOICE_ORDER, _SPLIT_CODES[split]]).permutation(len(voices))
    return [
        _plan_utterance(split, index, voices[int(order[index % len(voices)])], seed)
        for index in range(num_utterances)
    ]


def _plan_utterance(split: str, index: int, voice: Voice, seed: int) -> UtteranceSpec:
    rng = np.random.default_rng([seed, _STREAM_UTTERANCE, _SPLIT_CODES[split], index])
    num_words = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
    return UtteranceSpec(
        utt_id=f"{voice.speaker_id}-{split}-{index:06d}",
        voice=voice,
        words=tuple(VOCABULARY[int(i)] for i in rng.integers(0, len(VOCABULARY), size=num_words)),
        espeak_rate=int(rng.integers(ESPEAK_RATE_RANGE[0], ESPEAK_RATE_RANGE[1] + 1)),
        espeak_pitch=int(rng.integers(ESPEAK_PITCH_RANGE[0], ESPEAK_PITCH_RANGE[1] + 1)),
        # Rounded so that the recorded value is exactly what sox receives.
        tempo=round(float(rng.uniform(*TEMPO_RANGE)), 4),
        gain_db=float(rng.uniform(*GAIN_DB_RANGE)),
        snr_db=float(rng.uniform(*SNR_DB_RANGE)),
        noise_color=NOISE_COLORS[int(rng.integers(len(NOISE_COLORS)))],
        noise_seed=int(rng.integers(2**63)),
    )


def synthesize_speech(spec: UtteranceSpec, tools: Tools) -> np.ndarray:
    """Clean speech for ``spec`` as float32 at 16 kHz, with its gain applied.

    espeak-ng writes WAV to stdout and a single sox call applies tempo and
    resampling; sox emits 32-bit float so no dither (a random process) runs.
    """
    wav_22k = _run([
        tools.espeak, "-v", spec.voice.espeak_name, "-s", str(spec.espeak_rate),
        "-p", str(spec.espeak_pitch), "--stdout", spec.text.lower(),
    ])  # fmt: skip
    raw = _run(
        [tools.sox, "-V1", "-t", "wav", "-", "-t", "raw", "-e", "floating-point", "-b", "32",
         "-c", "1", "-r", str(SAMPLE_RATE), "-", "tempo", "-s", f"{spec.tempo:.4f}", "rate", str(SAMPLE_RATE)],
        stdin=wav_22k,
    )  # fmt: skip
    speech = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if speech.size == 0 or not np.any(speech):
        raise RuntimeError(f"espeak-ng produced silence for {spec.utt_id} ({spec.voice.espeak_name})")
    return speech * 10.0 ** (spec.gain_db / 20.0)


def add_noise(signal: np.ndarray, snr_db: float, rng: np.random.Generator, color: str = "white") -> np.ndarray:
    """Return ``signal`` plus white or pink noise at exactly ``snr_db``.

    The noise is rescaled by its *realised* power (not the expected one), so
    the SNR measured on the output equals ``snr_db`` up to float rounding.
    """
    if color not in NOISE_COLORS:
        raise ValueError(f"unknown noise color {color!r}; expected one of {NOISE_COLORS}")
    if signal.size < 2:
        raise ValueError("need at least 2 samples to shape and scale noise")
    noise = rng.standard_normal(signal.size)
    if color == "pink":
        noise = _pinken(noise)
    signal_power = float(np.mean(signal**2))
    noise_power = float(np.mean(noise**2))
    scale = np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return signal + scale * noise


def _pinken(white: np.ndarray) -> np.ndarray:
    """Shape white noise to a 1/f power spectrum (more low-frequency energy, like hum and rumble)."""
    spectrum = np.fft.rfft(white)
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0  # avoid division by zero; the DC bin is zeroed below
    spectrum /= np.sqrt(freqs)
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n=white.size)


def render_utterance(spec: UtteranceSpec, tools: Tools) -> np.ndarray:
    """Final 16-bit samples of ``spec``: speech, noise, peak limiting, quantisation."""
    noisy = add_noise(
        synthesize_speech(spec, tools), spec.snr_db, np.random.default_rng(spec.noise_seed), spec.noise_color
    )
    peak = float(np.max(np.abs(noisy)))
    if peak > _PEAK_LIMIT:  # scale rather than clip: keeps the SNR and avoids distortion
        noisy *= _PEAK_LIMIT / peak
    return np.round(noisy * 32767.0).astype("<i2")


def write_wav(path: PathLike, samples: np.ndarray) -> None:
    """Write 16 kHz mono 16-bit PCM with the stdlib (deterministic header)."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(samples.astype("<i2").tobytes())


def generate_corpus(
    out_dir: PathLike,
    seed: int = 0,
    num_train: int = DEFAULT_COUNTS["train"],
    num_dev: int = DEFAULT_COUNTS["dev"],
    num_test: int = DEFAULT_COUNTS["test"],
    nj: int = 2,
    force: bool = False,
    progress: bool = True,
) -> list[SplitReport]:
    """Build (or reuse) the train/dev/test Kaldi dirs under ``out_dir``.

    A split is reused when ``corpus.json`` records the same version, seed and
    count for it and its data dir validates, unless ``force`` is set.
    """
    counts = {"train": num_train, "dev": num_dev, "test": num_test}
    _check_arguments(seed, counts, nj)
    tools = find_tools()
    check_voices_available(tools)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*"):
        shutil.rmtree(stale)

    manifest = _load_manifest(out, seed)
    reports = []
    for split in SPLITS:
        reused = not force and _is_reusable(out / split, manifest, split, counts[split])
        if not reused:
            manifest["splits"].pop(split, None)
            _save_manifest(out, manifest)  # forget the old split before touching it
            _build_split(out, split, plan_split(split, counts[split], seed), tools, nj, progress)
            manifest["splits"][split] = counts[split]
            _save_manifest(out, manifest)
        reports.append(_report(out, split, reused))
    return reports


def _check_arguments(seed: int, counts: dict[str, int], nj: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    for split, count in counts.items():
        if count < 1:
            raise ValueError(f"num_{split} must be >= 1, got {count}")


def _load_manifest(out: Path, seed: int) -> dict:
    """Existing manifest if it was made by this version and seed, else a fresh one."""
    fresh = {"version": CORPUS_VERSION, "seed": seed, "splits": {}}
    try:
        manifest = json.loads((out / _MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return fresh
    same_settings = manifest.get("version") == CORPUS_VERSION and manifest.get("seed") == seed
    return manifest if same_settings and isinstance(manifest.get("splits"), dict) else fresh


def _save_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f"{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / _MANIFEST)


def _is_reusable(data_dir: Path, manifest: dict, split: str, count: int) -> bool:
    if manifest["splits"].get(split) != count or not data_dir.is_dir():
        return False
    try:
        return validate_data_dir(data_dir) == count
    except DataDirError as err:
        logger.warning("regenerating %s: %s", split, err)
        return False


def _build_split(out: Path, split: str, specs: Sequence[UtteranceSpec], tools: Tools, nj: int, progress: bool) -> None:
    """Render into a hidden temp dir, then move wavs and data dir into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=out))
    try:
        (tmp / "wav").mkdir()
        for _ in _progress(_render_all(specs, tools, tmp / "wav", nj), len(specs), split, progress):
            pass  # rendering happens as the iterator is consumed
        final_wav_dir = out / "wav" / split
        write_kaldi_dir(
            tmp / "data",
            ((s.utt_id, s.voice.speaker_id, str(final_wav_dir / f"{s.utt_id}.wav"), s.text) for s in specs),
        )
        _replace_split(out, split, tmp)
        validate_data_dir(out / split)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _render_all(specs: Sequence[UtteranceSpec], tools: Tools, wav_dir: Path, nj: int) -> Iterator[str]:
    """Yield utterance ids as their wav files are written (in any order)."""
    job = partial(_render_to_file, tools=tools, wav_dir=wav_dir)
    if nj == 1:
        yield from map(job, specs)
        return
    with multiprocessing.Pool(nj) as pool:
        # Chunks amortise inter-process overhead; order does not matter as
        # every utterance is self-contained.
        yield from pool.imap_unordered(job, specs, chunksize=max(1, min(16, len(specs) // (4 * nj))))


def _render_to_file(spec: UtteranceSpec, tools: Tools, wav_dir: Path) -> str:
    write_wav(wav_dir / f"{spec.utt_id}.wav", render_utterance(spec, tools))
    return spec.utt_id


def _progress(items: Iterable[str], total: int, desc: str, enabled: bool) -> Iterable[str]:
    """Wrap with a tqdm bar when wanted and available (tqdm is optional)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, unit="utt")


def _replace_split(out: Path, split: str, tmp: Path) -> None:
    """Swap in a finished split; the data dir goes last as the completion marker."""
    data_dir, wav_dir = out / split, out / "wav" / split
    for old in (data_dir, wav_dir):
        if old.exists():
            shutil.rmtree(old)
    wav_dir.parent.mkdir(exist_ok=True)
    os.rename(tmp / "wav", wav_dir)
    os.rename(tmp / "data", data_dir)


def _report(out: Path, split: str, reused: bool) -> SplitReport:
    num_utts = sum(1 for _ in (out / split / "utt2spk").open(encoding="utf-8"))
    num_spks = sum(1 for _ in (out / split / "spk2utt").open(encoding="utf-8"))
    return SplitReport(split, out / split, num_utts, num_spks, reused)


def _run(cmd: list[str], stdin: Optional[bytes] = None) -> bytes:
    """Run a tool and return stdout; failures carry the tool's stderr."""
    result = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{Path(cmd[0]).name} failed with exit code {result.returncode}: {stderr}")
    return result.stdout
