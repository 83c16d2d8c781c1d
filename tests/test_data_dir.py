"""Your own corpus (``--data_dir``): every malformed corpus is refused, by name, before anything runs.

Each case breaks one thing in an otherwise valid three-subset corpus of real 16 kHz wav files and
checks that the error names the problem and the file (or the config and its YAML path), through
the library, the ``validate_data`` CLI, ``run_tiny`` and the benchmarks' corpus set-up, and that
no output dir was written.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Tuple

import numpy as np
import pytest
import soundfile
import yaml

from espnet_compress.bin import run_tiny as run_tiny_cli
from espnet_compress.bin import validate_data
from espnet_compress.corpus.kaldi_dir import (
    DataDirError,
    SampleRate,
    validate_corpus_dir,
    validate_data_dir,
    write_kaldi_dir,
)
from espnet_compress.pipeline.data import DATA_SOURCE, corpus_of, frontend_sample_rate, resolve_corpus
from espnet_compress.pipeline.tiny import CONF_DIR, TinyRunConfig, TinySystem, run_tiny
from tests.conftest import benchmark

BASELINE = CONF_DIR / "train_asr_conformer_tiny.yaml"
RATE = SampleRate(16000, "frontend_conf.fs in test")
SIZES = {"train": 3, "dev": 2, "test": 2}


def _wav(path: Path, fs: int = 16000, channels: int = 1) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.zeros((fs // 10, channels) if channels > 1 else fs // 10, dtype=np.float32)
    soundfile.write(path, samples, fs)
    return str(path)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A valid corpus: ``train``/``dev``/``test`` with 16 kHz mono wavs."""
    root = tmp_path / "corpus"
    for subset, count in SIZES.items():
        entries = [(f"spk{i % 2}-{subset}{i}", f"spk{i % 2}", _wav(root / "wav" / f"{subset}{i}.wav"), "GO LEFT")
                   for i in range(count)]
        write_kaldi_dir(root / subset, entries)
    return root


def _expect(corpus: Path, *fragments: str, sample_rate: SampleRate = RATE) -> str:
    with pytest.raises(DataDirError) as info:
        validate_corpus_dir(corpus, sample_rate)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def _first_wav(corpus: Path, subset: str = "dev") -> Path:
    return Path((corpus / subset / "wav.scp").read_text().split()[1])


def test_valid_corpus_counts_every_subset(corpus: Path) -> None:
    assert validate_corpus_dir(corpus, RATE) == SIZES


def test_missing_subsets_are_all_named(corpus: Path) -> None:
    for subset in ("dev", "test"):
        for f in (corpus / subset).iterdir():
            f.unlink()
        (corpus / subset).rmdir()
    _expect(corpus, str(corpus), "missing subset(s) 'dev', 'test'", "train, dev, test", "wav.scp, text, utt2spk")


def test_missing_file_names_the_file(corpus: Path) -> None:
    (corpus / "test" / "utt2spk").unlink()
    _expect(corpus, str(corpus / "test" / "utt2spk"), "missing")


def test_unsorted_file_names_file_line_and_fix(corpus: Path) -> None:
    text = corpus / "train" / "text"
    lines = text.read_text().splitlines(keepends=True)
    text.write_text("".join(reversed(lines)))
    _expect(corpus, str(text), "not sorted at line 2", "LC_ALL=C sort")


def test_mismatched_ids_name_the_id_and_both_files(corpus: Path) -> None:
    utt2spk = corpus / "dev" / "utt2spk"
    utt2spk.write_text(utt2spk.read_text().replace("spk1-dev1", "spk1-dev9"))
    _expect(corpus, str(utt2spk), "'spk1-dev9'", "not in wav.scp")


def test_empty_transcript_names_the_utterance(corpus: Path) -> None:
    text = corpus / "test" / "text"
    text.write_text(text.read_text().replace("spk0-test0 GO LEFT", "spk0-test0"))
    _expect(corpus, str(text), "empty transcript for 'spk0-test0'")


def test_empty_subset_is_refused(corpus: Path) -> None:
    for name in ("wav.scp", "text", "utt2spk", "spk2utt"):
        (corpus / "test" / name).write_text("")
    _expect(corpus, str(corpus / "test"), "no utterances")


def test_non_audio_file_is_named(corpus: Path) -> None:
    _first_wav(corpus).write_text("this is not audio\n")
    _expect(corpus, str(corpus / "dev" / "wav.scp"), "'spk0-dev0'", "not a readable audio file")


def test_sample_rate_other_than_the_configs(corpus: Path) -> None:
    _wav(_first_wav(corpus, "train"), fs=8000)
    rate = frontend_sample_rate(BASELINE)
    _expect(corpus, str(corpus / "train" / "wav.scp"), "'spk0-train0'", "8000 Hz",
            f"frontend_conf.fs in {BASELINE} is 16000 Hz", "sox", sample_rate=rate)


def test_multichannel_audio_is_refused(corpus: Path) -> None:
    _wav(_first_wav(corpus, "test"), channels=2)
    _expect(corpus, "'spk0-test0'", "2 channels", "mono")


def test_audio_headers_are_only_read_when_a_rate_is_asked_for(corpus: Path) -> None:
    _first_wav(corpus).write_text("not audio")
    assert validate_data_dir(corpus / "dev") == SIZES["dev"]  # structure only, as before


@pytest.mark.parametrize("fs,expected", [(None, 16000), (8000, 8000), ("8k", 8000), ("16k", 16000)])
def test_config_sample_rate(tmp_path: Path, fs, expected: int) -> None:
    conf = {"frontend_conf": {"n_fft": 512}} if fs is None else {"frontend_conf": {"fs": fs}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(conf))
    assert frontend_sample_rate(path) == SampleRate(expected, f"frontend_conf.fs in {path}")


def test_bad_config_sample_rate_names_the_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"frontend_conf": {"fs": "fast"}}))
    with pytest.raises(ValueError, match=f"frontend_conf.fs in {path}: 'fast' is not a sample rate"):
        frontend_sample_rate(path)


def test_systems_with_different_rates_are_refused(tmp_path: Path, corpus: Path) -> None:
    other = tmp_path / "train_8k.yaml"
    other.write_text(yaml.safe_dump({"frontend_conf": {"fs": 8000}}))
    with pytest.raises(ValueError, match=f"{other} is 8000 Hz"):
        resolve_corpus(tmp_path / "exp", corpus, [BASELINE, other])
    assert not (tmp_path / "exp").exists()


def test_out_dir_is_bound_to_its_corpus(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "exp"
    first = resolve_corpus(out, corpus, [BASELINE])
    assert first.counts == SIZES and json.loads((out / DATA_SOURCE).read_text()) == {"data_dir": str(corpus)}
    assert resolve_corpus(out, None, [BASELINE]) == first  # a rerun (or a benchmark) finds it again
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match=f"was made from the corpus {corpus}"):
        resolve_corpus(out, other, [BASELINE])
    synthetic = tmp_path / "synthetic"
    (synthetic / "data").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds the synthetic corpus"):
        resolve_corpus(synthetic, corpus, [BASELINE])
    assert resolve_corpus(tmp_path / "fresh", None, [BASELINE]) is None


def test_corpus_of_a_main_job_either_way(tmp_path: Path, corpus: Path) -> None:
    """Benchmarks that start from a finished main job find its corpus whether the job was made
    from a --data_dir (bound) or made the synthetic corpus itself; anything else is named."""
    bound = tmp_path / "bound"
    resolve_corpus(bound, corpus, [BASELINE])
    assert corpus_of(bound) == corpus
    synthetic = tmp_path / "synthetic"
    (synthetic / "data").mkdir(parents=True)
    assert corpus_of(synthetic) == (synthetic / "data").resolve()
    with pytest.raises(ValueError, match="holds no corpus"):
        corpus_of(tmp_path / "empty")


def test_benchmarks_fine_tune_with_the_main_jobs_training_seed(tmp_path: Path) -> None:
    from benchmarks.main_job import main_job_seed

    (tmp_path / "asr_conformer").mkdir()
    (tmp_path / "asr_conformer" / "config.yaml").write_text("seed: 1\nmax_epoch: 40\n")
    assert main_job_seed(tmp_path) == 1
    with pytest.raises(SystemExit, match="no finished baseline"):
        main_job_seed(tmp_path / "missing")


def test_run_tiny_refuses_a_bad_corpus_before_writing_anything(tmp_path: Path, corpus: Path) -> None:
    _wav(_first_wav(corpus, "test"), fs=22050)
    out = tmp_path / "exp"
    cfg = TinyRunConfig(out_dir=out, systems=[TinySystem("conformer", BASELINE)], reloaded=[], data_dir=corpus)
    with pytest.raises(DataDirError, match="22050 Hz"):
        run_tiny(cfg)
    assert not out.exists()


def test_run_tiny_cli_exits_2_with_the_message(tmp_path: Path, corpus: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (corpus / "dev" / "text").unlink()
    out = tmp_path / "exp"
    assert run_tiny_cli.main(["--out_dir", str(out), "--data_dir", str(corpus)]) == 2
    assert f"run_tiny: {corpus / 'dev' / 'text'}: missing" in capsys.readouterr().err
    assert not out.exists()


def test_validate_cli_checks_a_corpus_against_a_config(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_data.main(["--corpus", "--config", str(BASELINE), str(corpus)]) == 0
    assert "train 3, dev 2, test 2 utterances" in capsys.readouterr().out
    _wav(_first_wav(corpus), fs=8000)
    assert validate_data.main(["--corpus", "--fs", "16000", str(corpus)]) == 1
    assert "but --fs is 16000 Hz" in capsys.readouterr().err
    assert validate_data.main([str(corpus / "train"), "--fs", "16000"]) == 0


def _benchmark_args(**values) -> Tuple[ModuleType, argparse.Namespace]:
    """The benchmarks' shared corpus options (``benchmarks/`` is not a package: imported by path)."""
    nested_supernet = benchmark("nested_supernet")
    parser = argparse.ArgumentParser()
    nested_supernet.add_common_args(parser)
    args = parser.parse_args([f"--{k}={v}" for k, v in values.items()])
    return nested_supernet, args


def test_benchmarks_refuse_a_bad_corpus_before_writing_anything(tmp_path: Path, corpus: Path) -> None:
    text = corpus / "train" / "text"
    text.write_text(text.read_text().replace("spk0-train0 GO LEFT", "spk0-train0"))
    benchmark, args = _benchmark_args(exp_dir=tmp_path / "exp", data_dir=corpus)
    with pytest.raises(SystemExit, match="empty transcript for 'spk0-train0'"):
        benchmark.prepare_corpus(args)
    assert not (tmp_path / "exp").exists()


def test_nested_benchmark_refuses_a_config_it_cannot_compare_before_writing(tmp_path: Path) -> None:
    """``benchmarks/nested_supernet.py`` trains one twin per system of ``--config`` (a two-system
    config trains one twin, not four): a system without a known twin, or a config whose first
    system is not ``full`` (the largest, compared with the baseline), stops before anything exists."""
    benchmark, _ = _benchmark_args()
    conf = yaml.safe_load((CONF_DIR / "train_asr_nested_conformer_tiny_half.yaml").read_text())
    assert list(conf["model_conf"]["systems"]) == ["full", "half_int8"]
    assert set(conf["model_conf"]["systems"]) <= set(benchmark.TWINS)
    for systems, needle in (({"full": {}, "quarter": {"blocks": [0]}}, "no twin config known for system(s) ['quarter']"),
                            ({"half_int8": {"blocks": [0, 3]}, "full": {}}, "must list 'full' first")):
        conf["model_conf"]["systems"] = systems
        config = tmp_path / "nested.yaml"
        config.write_text(yaml.safe_dump(conf, sort_keys=False))
        with pytest.raises(SystemExit, match=re.escape(needle)):
            benchmark.main(["--exp_dir", str(tmp_path / "exp"), "--config", str(config)])
        assert not (tmp_path / "exp").exists()
