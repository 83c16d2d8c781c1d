"""Speed of the exact bit allocation (eq. 8) at a realistic size: target under 1 s.

Every Linear/Conv1d of the LibriSpeech-100 Conformer (``conf/librispeech_100/train_asr_conformer.yaml``:
12 encoder blocks, 6 decoder blocks) x 6 widths {1, 2, 3, 4, 6, 8}, built from that config with
random weights (the solve depends only on weight counts and sensitivities). The sensitivities are
random, decreasing in the width, log-normal across layers (measured tables span several decades
the same way); ``--seed`` changes them. Times the whole frontier solve plus one allocation per
budget (minimum of ``--repeats`` runs) and checks every answer fits its budget.

Usage::

    .venv/bin/python benchmarks/mixed_precision_dp.py [--repeats 3] [--seed 0]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml

from espnet_compress.mixed_precision.allocation import Budget, Problem, solve
from espnet_compress.mixed_precision.sensitivity import DEFAULT_WIDTHS, measured_layers

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "librispeech_100" / "train_asr_conformer.yaml"
TARGET_SECONDS = 1.0


def _model():
    """The config's encoder and decoder (no front end or statistics needed for the layer list)."""
    import torch
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    conf = yaml.safe_load(CONFIG.read_text())
    model = torch.nn.Module()
    model.encoder = ConformerEncoder(80, **conf["encoder_conf"])
    model.decoder = TransformerDecoder(5000, conf["encoder_conf"]["output_size"], **conf["decoder_conf"])
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    layers = measured_layers(_model())
    rng = np.random.default_rng(args.seed)
    omega = np.sort(rng.lognormal(-6, 2, size=(len(layers), len(DEFAULT_WIDTHS))), axis=1)[:, ::-1].copy()
    problem = Problem(tuple(layers), tuple(m.weight.numel() for m in layers.values()), DEFAULT_WIDTHS, omega)
    budgets = [Budget(b) for b in (1.5, 2.5, 3.0, 4.0, 6.0)]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        frontier = solve(problem)
        chosen = [frontier.best_under(b) for b in budgets]
        times.append(time.perf_counter() - start)
    for b, a in zip(budgets, chosen):
        assert a.total_bits <= b.total_bits(problem.num_weights)
    best = min(times)
    print(f"{len(layers)} sub-layers ({problem.num_weights:,} weights) x {len(DEFAULT_WIDTHS)} widths: frontier of "
          f"{len(frontier):,} points, solve + {len(budgets)} allocations in {best:.3f} s (min of {args.repeats}); "
          f"target < {TARGET_SECONDS:g} s: {'met' if best < TARGET_SECONDS else 'MISSED'} "
          f"({TARGET_SECONDS / best:.1f}x margin)")


if __name__ == "__main__":
    main()
