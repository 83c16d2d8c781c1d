"""The asr.sh stages as Python functions calling the same ``espnet2.bin`` programs.

``egs2/TEMPLATE/asr1/asr.sh`` is only in ESPnet's git repository, so a pip-installed ESPnet cannot run
it. This driver calls the very programs asr.sh calls (``tokenize_text``, ``asr_train
--collect_stats``, ``aggregate_stats_dirs``, ``asr_train``, ``asr_inference``) with the arguments
asr.sh would pass for ``--feats_type raw --token_type word``, so whatever trains and decodes here
also works in a recipe. Each program runs in a subprocess with its log kept on disk, exactly like
asr.sh's ``run.pl`` jobs, and a stage whose outputs exist is skipped (restartable like ``--stage``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from espnet_compress.corpus.kaldi_dir import validate_data_dir
from espnet_compress.utils.io import atomic_write_text

log = logging.getLogger(__name__)


#: written into a training dir when ``asr_train`` exited successfully
TRAIN_DONE = "train.done"


class StageError(RuntimeError):
    """A stock ESPnet program failed; the message carries the command, its log and the log's tail."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """A named pipeline step and the wall time it took (for reports)."""

    name: str
    seconds: float
    skipped: bool


def run_program(module: str, args: Sequence[str], log_file: Path, threads: Optional[int] = None) -> None:
    """Run ``python -m <module> <args>`` with its output in ``log_file``; raise :class:`StageError`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, *map(str, args)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(log_file, "w") as fh:
        fh.write("# " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise StageError(f"{module} failed (exit {proc.returncode}); log: {log_file}\n{tail}")


@dataclasses.dataclass
class AsrExperiment:
    """One ASR system through the stock stages: stats, training, decoding.

    Attributes:
        data_dir: Kaldi data dirs ``<data_dir>/<set>`` (wav.scp, text, utt2spk).
        train_set, valid_set, test_sets: set names under ``data_dir``.
        token_list: shared word token list (built once per corpus by :func:`make_token_list`).
        stats_dir: shared ``asr_stats`` dir (feature statistics and shapes, built once per corpus).
        exp_dir: this system's ESPnet output dir (``exp/asr_<tag>`` in a recipe).
        train_config, inference_config: ESPnet YAML configs.
        train_args: extra ``asr_train`` arguments (``--init_param ...``, overrides).
    """

    data_dir: Path
    train_set: str
    valid_set: str
    test_sets: Sequence[str]
    token_list: Path
    stats_dir: Path
    exp_dir: Path
    train_config: Path
    inference_config: Path
    train_args: Sequence[str] = ()
    inference_model: str = "valid.acc.best.pth"
    decode_nj: int = 2

    # ------------------------------------------------------------------ common args
    def _data_args(self, prefix: str, dset: str) -> List[str]:
        return [
            f"--{prefix}_data_path_and_name_and_type", f"{self.data_dir / dset / 'wav.scp'},speech,sound",
            f"--{prefix}_data_path_and_name_and_type", f"{self.data_dir / dset / 'text'},text,text",
        ]

    def _token_args(self) -> List[str]:
        return ["--token_type", "word", "--token_list", str(self.token_list), "--bpemodel", "none",
                "--use_preprocessor", "true", "--cleaner", "none", "--g2p", "none"]

    # ------------------------------------------------------------------ stages
    def is_trained(self) -> bool:
        """Whether training ran to its end (see :func:`training_finished`)."""
        return training_finished(self.exp_dir, self.inference_model)

    def train(self) -> bool:
        """asr.sh stage 11. Returns False when training already finished (skipped); an
        interrupted training is resumed from its ``checkpoint.pth`` (``--resume true``)."""
        model = self.exp_dir / self.inference_model
        if self.is_trained():
            return False
        for dset in (self.train_set, self.valid_set):
            validate_data_dir(self.data_dir / dset)
        stats = self.stats_dir
        args = [
            *self._token_args(),
            "--normalize", "global_mvn",
            "--normalize_conf", f"stats_file={stats / 'train' / 'feats_stats.npz'}",
            *self._data_args("train", self.train_set),
            *self._data_args("valid", self.valid_set),
            "--train_shape_file", stats / "train" / "speech_shape",
            "--train_shape_file", stats / "train" / "text_shape.word",
            "--valid_shape_file", stats / "valid" / "speech_shape",
            "--valid_shape_file", stats / "valid" / "text_shape.word",
            "--resume", "true", "--ngpu", "0",
            "--output_dir", self.exp_dir, "--config", self.train_config,
            *self.train_args,
        ]
        run_program("espnet2.bin.asr_train", args, self.exp_dir / "train.log")
        if not model.exists():
            raise StageError(f"training finished but {model} was not written; see {self.exp_dir / 'train.log'}")
        atomic_write_text(self.exp_dir / TRAIN_DONE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        return True

    def decode_dir(self) -> Path:
        """Where hypotheses go, named like asr.sh's ``decode_<inference_tag>``."""
        return self.exp_dir / f"decode_{Path(self.inference_config).stem}_{Path(self.inference_model).stem}"

    def decode(self, extra_args: Sequence[str] = ()) -> bool:
        """asr.sh stage 12: split keys over ``decode_nj`` single-thread jobs, then merge ``text``."""
        ran = False
        for dset in self.test_sets:
            out = self.decode_dir() / dset
            if (out / "text").exists():
                continue
            validate_data_dir(self.data_dir / dset)
            keys = [ln.split(maxsplit=1)[0] for ln in (self.data_dir / dset / "wav.scp").read_text().splitlines() if ln.strip()]
            nj = max(1, min(self.decode_nj, len(keys)))
            logdir = out / "logdir"
            procs = []
            for job in range(nj):
                key_file = logdir / f"keys.{job + 1}.scp"
                key_file.parent.mkdir(parents=True, exist_ok=True)
                key_file.write_text("".join(f"{k}\n" for k in keys[job::nj]))
                args = [
                    "--ngpu", "0", "--batch_size", "1",
                    "--data_path_and_name_and_type", f"{self.data_dir / dset / 'wav.scp'},speech,sound",
                    "--key_file", key_file,
                    "--asr_train_config", self.exp_dir / "config.yaml",
                    "--asr_model_file", self.exp_dir / self.inference_model,
                    "--output_dir", logdir / f"output.{job + 1}",
                    "--config", self.inference_config,
                    *extra_args,
                ]
                procs.append((job, _spawn("espnet2.bin.asr_inference", args, logdir / f"asr_inference.{job + 1}.log")))
            for job, proc in procs:
                proc.wait()
                if proc.returncode != 0:
                    log_file = logdir / f"asr_inference.{job + 1}.log"
                    tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-25:])
                    raise StageError(f"asr_inference job {job + 1} failed; log: {log_file}\n{tail}")
            lines: List[str] = []
            for job in range(nj):
                part = logdir / f"output.{job + 1}" / "1best_recog" / "text"
                lines.extend(part.read_text().splitlines() if part.exists() else [])
            atomic_write_text(out / "text", "".join(f"{ln}\n" for ln in sorted(lines)))
            ran = True
        return ran


def training_finished(exp_dir: Path, model_name: str = "valid.acc.best.pth") -> bool:
    """Whether the training in ``exp_dir`` ran to its end. ``valid.acc.best.pth`` exists from the
    first epoch on, so it says nothing about an interrupted run; ``train.done`` is written when
    ``asr_train`` exits successfully (older runs: asr_train's own "The training was finished" line)."""
    exp_dir = Path(exp_dir)
    if not (exp_dir / model_name).exists():
        return False
    if (exp_dir / TRAIN_DONE).exists():
        return True
    log_file = exp_dir / "train.log"
    return log_file.exists() and "The training was finished at" in log_file.read_text(errors="replace")


def _spawn(module: str, args: Sequence[str], log_file: Path) -> subprocess.Popen:
    """Start a single-threaded stock program (decode jobs run side by side, one per core)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    fh = open(log_file, "w")
    cmd = [sys.executable, "-m", module, *map(str, args)]
    fh.write("# " + " ".join(cmd) + "\n")
    fh.flush()
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def make_token_list(train_text: Path, token_list: Path) -> bool:
    """asr.sh stage 5 for ``--token_type word``: ``tokenize_text`` with blank/unk/sos-eos symbols."""
    if token_list.exists():
        return False
    token_list.parent.mkdir(parents=True, exist_ok=True)
    tmp = token_list.with_name(token_list.name + ".tmp")
    run_program(
        "espnet2.bin.tokenize_text",
        ["--token_type", "word", "--input", train_text, "--output", tmp, "--field", "2-",
         "--cleaner", "none", "--g2p", "none", "--write_vocabulary", "true",
         "--add_symbol", "<blank>:0", "--add_symbol", "<unk>:1", "--add_symbol", "<sos/eos>:-1"],
        token_list.parent / "tokenize_text.log",
    )
    os.replace(tmp, token_list)
    return True


def collect_stats(exp: AsrExperiment) -> bool:
    """asr.sh stages 10: ``asr_train --collect_stats`` then ``aggregate_stats_dirs``, then the
    ``text_shape.word`` files (token counts appended) that training's batch sampler reads."""
    stats = exp.stats_dir
    if (stats / "train" / "feats_stats.npz").exists():
        return False
    for dset in (exp.train_set, exp.valid_set):
        validate_data_dir(exp.data_dir / dset)
    work = stats / "logdir" / "stats.1"
    shutil.rmtree(work, ignore_errors=True)
    args = [
        "--collect_stats", "true", *exp._token_args(),
        *exp._data_args("train", exp.train_set), *exp._data_args("valid", exp.valid_set),
        "--train_shape_file", exp.data_dir / exp.train_set / "wav.scp",
        "--valid_shape_file", exp.data_dir / exp.valid_set / "wav.scp",
        "--output_dir", work, "--config", exp.train_config, "--ngpu", "0",
    ]
    run_program("espnet2.bin.asr_train", args, stats / "logdir" / "stats.1.log")
    run_program("espnet2.bin.aggregate_stats_dirs", ["--input_dir", work, "--output_dir", stats],
                stats / "logdir" / "aggregate.log")
    n_tokens = sum(1 for _ in exp.token_list.open())
    for split in ("train", "valid"):
        shape = stats / split / "text_shape"
        atomic_write_text(stats / split / "text_shape.word",
                      "".join(f"{ln},{n_tokens}\n" for ln in shape.read_text().splitlines() if ln))
    return True


def timed(name: str, fn, *args, **kwargs) -> Stage:
    """Run a stage function that returns whether it did work, and time it."""
    start = time.perf_counter()
    did = fn(*args, **kwargs)
    stage = Stage(name, time.perf_counter() - start, skipped=not did)
    log.info("stage %-24s %s (%.1f s)", name, "skipped: outputs exist" if stage.skipped else "done", stage.seconds)
    return stage


def read_config(path: Path) -> Dict:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}
