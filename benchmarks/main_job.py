"""Shared by the benchmarks that start from a finished main job (``run_tiny``): train and decode
new systems beside the main job's, reusing its finished stages.

The run dir is a hard-linked copy of the main job's reused outputs (token list, stats, finished
trainings), so ``run_tiny`` skips them and only the new systems train; every new system is a
packed fine-tune of the fp32 ``conformer``, judged against the equal-update ``fp32_finetune``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from espnet_compress.pipeline.data import corpus_of
from espnet_compress.pipeline.tiny import CONF_DIR


def main_job_seed(main_job: Path) -> int:
    """``asr_train --seed`` of the main job's baseline (from its written config)."""
    config = main_job / "asr_conformer" / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"{main_job}: no finished baseline ({config} is missing); run the main job first")
    return int(yaml.safe_load(config.read_text()).get("seed", 0))


def run_beside_main_job(main_job: Path, run_dir: Path, reused: Sequence[str], finetunes: Mapping[str, Path]) -> None:
    """``run_tiny`` in ``run_dir`` with the baseline, its control and ``finetunes`` (name -> config),
    each initialised from the baseline, packed, and compared with the control. Every training runs
    with the main job's training seed (its baseline's ``seed``), so a second-seed main job gets
    second-seed fine-tunes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in reused:
        src, dst = main_job / name, run_dir / name
        if src.exists() and not dst.exists():
            shutil.copytree(src, dst, copy_function=os.link) if src.is_dir() else shutil.copy(src, dst)
    cmd = [sys.executable, "-m", "espnet_compress.bin.run_tiny", "--out_dir", str(run_dir), "--nj", "1",
           "--data_dir", str(corpus_of(main_job)), "--train_seed", str(main_job_seed(main_job)),
           "--system", f"conformer={CONF_DIR / 'train_asr_conformer_tiny.yaml'}",
           "--system", f"fp32_finetune={CONF_DIR / 'train_asr_conformer_tiny_finetune.yaml'},init_from=conformer"]
    for name, config in finetunes.items():
        cmd += ["--system", f"{name}={config},init_from=conformer,packed,control=fp32_finetune"]
    subprocess.run(cmd, check=True)
