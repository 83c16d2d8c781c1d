"""Shared by the benchmarks that start from a finished main job (``run_tiny``): train and decode
new systems beside the main job's, reusing its finished stages.

The run dir is a hard-linked copy of the main job's reused outputs (token list, stats, finished
trainings), so ``run_tiny`` skips them and only the new systems train; every new system is a
packed fine-tune of the fp32 ``conformer``, judged against the equal-update ``fp32_finetune``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from espnet_compress.pipeline.tiny import CONF_DIR


def run_beside_main_job(main_job: Path, run_dir: Path, reused: Sequence[str], finetunes: Mapping[str, Path]) -> None:
    """``run_tiny`` in ``run_dir`` with the baseline, its control and ``finetunes`` (name -> config),
    each initialised from the baseline, packed, and compared with the control."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in reused:
        src, dst = main_job / name, run_dir / name
        if src.exists() and not dst.exists():
            shutil.copytree(src, dst, copy_function=os.link) if src.is_dir() else shutil.copy(src, dst)
    source = json.loads((main_job / "data_source.json").read_text())
    cmd = [sys.executable, "-m", "espnet_compress.bin.run_tiny", "--out_dir", str(run_dir), "--nj", "1",
           "--data_dir", str(source["data_dir"]),
           "--system", f"conformer={CONF_DIR / 'train_asr_conformer_tiny.yaml'}",
           "--system", f"fp32_finetune={CONF_DIR / 'train_asr_conformer_tiny_finetune.yaml'},init_from=conformer"]
    for name, config in finetunes.items():
        cmd += ["--system", f"{name}={config},init_from=conformer,packed,control=fp32_finetune"]
    subprocess.run(cmd, check=True)
