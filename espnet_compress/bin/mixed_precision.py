"""Per-layer bit widths under a size budget from KL sensitivities (lossless 4-bit paper, section 5).

Usage::

    python -m espnet_compress.bin.mixed_precision --asr_train_config exp/asr_conformer/config.yaml \\
        --asr_model_file exp/asr_conformer/valid.acc.best.pth --data_dir data/dev \\
        --budget 4 --out_dir exp/mixed_precision

measures Omega_i(n) of every encoder and decoder Linear/Conv1d on held-out utterances (cached in
``sensitivity.npz``, refused if it belongs to another model), solves eq. 8 exactly over the Pareto
frontier and writes, per budget, ``bits_<budget>.yaml``: the keys to merge into the fp model's
training config for QAT (``encoder_conf.quant_conf.bits``, ``model_conf.decoder_quant.bits``);
plus ``allocation.md`` (chosen and uniform points, width per sub-layer) and ``frontier.png``.
Several ``--budget`` values give one allocation each; ``--monotonic`` makes a larger budget never
give a layer fewer bits (systems of one nested supernet).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

import yaml

from espnet_compress.mixed_precision.allocation import AllocationError, Budget, Problem, allocate_nested, solve
from espnet_compress.mixed_precision.report import allocation_table, budget_label, plot_frontier
from espnet_compress.mixed_precision.sensitivity import (DEFAULT_WIDTHS, TARGETS, SensitivityError,
                                                         config_fragment, held_out_batches, load_or_measure,
                                                         measured_layers)
from espnet_compress.utils.io import atomic_write_text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asr_train_config", type=Path, required=True, help="the fp model's config.yaml")
    p.add_argument("--asr_model_file", type=Path, required=True, help="its checkpoint")
    p.add_argument("--data_dir", type=Path, required=True, help="held-out Kaldi data dir (e.g. dev)")
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--budget", type=float, action="append", required=True,
                   help="size limit (repeatable: one allocation per budget)")
    p.add_argument("--budget_unit", choices=Budget.UNITS, default="avg_bits",
                   help="avg_bits: average bits per quantized weight; bytes/bits: of the integer codes")
    p.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS),
                   help="candidate widths (0 = keep full precision)")
    p.add_argument("--target", choices=TARGETS, default="encoder",
                   help="encoder sub-layers' distribution: softmax of the encoder output (paper) or CTC posteriors")
    p.add_argument("--per_channel", action="store_true", help="measure (and train) with per-channel scales")
    p.add_argument("--no_decoder", action="store_true", help="allocate the encoder only")
    p.add_argument("--monotonic", action="store_true",
                   help="with several budgets: a larger budget never gives a layer fewer bits")
    p.add_argument("--num_utts", type=int, default=64, help="held-out utterances measured on")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--cache", type=Path, default=None, help="sensitivity cache (default OUT_DIR/sensitivity.npz)")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for path in (args.asr_train_config, args.asr_model_file):
        if not path.is_file():
            print(f"mixed_precision: {path} does not exist", file=sys.stderr)
            return 2
    try:
        budgets = [Budget(float(v), args.budget_unit) for v in args.budget]
        from espnet2.tasks.asr import ASRTask

        model, train_args = ASRTask.build_model_from_file(args.asr_train_config, args.asr_model_file, "cpu")
        layers = measured_layers(model, include_decoder=not args.no_decoder)
        # fail on an impossible budget before minutes of measuring
        shape_only = Problem.shape_only({n: m.weight.numel() for n, m in layers.items()}, args.widths)
        for budget in budgets:
            shape_only.check_budget(budget)
        batches, data_id = held_out_batches(args.data_dir, train_args, args.num_utts, args.batch_size)
        table = load_or_measure(args.cache or args.out_dir / "sensitivity.npz", model, batches, args.widths,
                                args.target, args.per_channel, not args.no_decoder, not args.no_progress, data_id)
        problem = table.problem()
        frontier = solve(problem)
        chosen = allocate_nested(problem, budgets, monotonic=args.monotonic) if args.monotonic \
            else [frontier.best_under(b) for b in budgets]
    except (AllocationError, SensitivityError, ValueError) as err:
        print(f"mixed_precision: {err}", file=sys.stderr)
        return 2
    encoder = train_args.encoder
    for budget, alloc in zip(budgets, chosen):
        fragment = config_fragment(alloc.bits, encoder, args.per_channel)
        header = (f"# KL-sensitivity mixed precision of {args.asr_model_file} (target {args.target}, "
                  f"{table.num_utts} utterances of {args.data_dir})\n# budget {budget.describe()}: "
                  f"{alloc.avg_bits:.3f} average bits, {alloc.bytes:,.0f} bytes of codes, "
                  f"sum of Omega {alloc.omega:.5g}\n# merge into the fp config and fine-tune from its checkpoint\n")
        atomic_write_text(args.out_dir / f"bits_{budget_label(budget)}.yaml",
                          header + yaml.safe_dump(fragment, sort_keys=False))
    atomic_write_text(args.out_dir / "allocation.md", allocation_table(frontier, budgets, chosen))
    plot_frontier(frontier, chosen, [budget.describe() for budget in budgets], args.out_dir / "frontier.png")
    for budget, alloc in zip(budgets, chosen):
        print(f"budget {budget.describe()}: {alloc.avg_bits:.3f} average bits, sum of Omega {alloc.omega:.5g} "
              f"-> {args.out_dir / ('bits_' + budget_label(budget) + '.yaml')}")
    print(f"frontier of {len(frontier)} points; table {args.out_dir / 'allocation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
