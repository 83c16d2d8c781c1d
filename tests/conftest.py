"""Shared fixtures: tiny model options and the ESPnet ASR task with our plugin registered."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_conformer_options(**overrides) -> Dict:
    """A Conformer small enough to run in milliseconds but with every sub-module present."""
    opts = dict(
        output_size=32, attention_heads=2, linear_units=48, num_blocks=3, dropout_rate=0.0,
        positional_dropout_rate=0.0, attention_dropout_rate=0.0, input_layer="conv2d",
        macaron_style=True, rel_pos_type="latest", pos_enc_layer_type="rel_pos",
        selfattention_layer_type="rel_selfattn", use_cnn_module=True, cnn_module_kernel=5,
    )
    opts.update(overrides)
    return opts


def benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` as a module (the folder is not a package: imported by path, which
    stays on ``sys.path`` for the benchmarks' imports of each other)."""
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def run_python(args: List[str], **kwargs):
    """Run ``python <args>`` in a subprocess with this interpreter (so the installed hook applies)."""
    import subprocess

    env = dict(os.environ)
    env.update(kwargs.pop("env", {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, **kwargs)


@pytest.fixture(scope="session")
def asr_task():
    import espnet2.tasks.asr as asr

    return asr
