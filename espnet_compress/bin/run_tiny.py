"""Run the tiny pipeline end to end and print the comparison table.

Usage::

    python -m espnet_compress.bin.run_tiny --out_dir exp/tiny
    python -m espnet_compress.bin.run_tiny --out_dir exp/mine --data_dir /path/to/corpus   # train/ dev/ test/
    python -m espnet_compress.bin.run_tiny --out_dir /tmp/t --num_train 40 --num_dev 8 --num_test 8 \
        --system small=my_small.yaml --system ft=my_small_ft.yaml,init_from=small \
        --system q4=my_q4.yaml,init_from=small,packed,control=ft \
        --baseline small --train_arg=--max_epoch --train_arg=1
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from espnet_compress.pipeline.tiny import DEFAULT_RELOADED, DEFAULT_SYSTEMS, ReloadedSystem, TinyRunConfig, TinySystem, run_tiny


SYSTEM_SYNTAX = "NAME=CONFIG.yaml[,init_from=NAME][,packed][,control=NAME]"


def _system(value: str) -> TinySystem:
    """``NAME=CONFIG[,init_from=OTHER][,packed][,control=OTHER]``."""
    head, *opts = value.split(",")
    name, sep, config = head.partition("=")
    if not sep or not name or not config:
        raise argparse.ArgumentTypeError(f"expected {SYSTEM_SYNTAX}, got '{value}'")
    init_from, packed, control = None, False, None
    for opt in opts:
        if opt == "packed":
            packed = True
        elif opt.startswith("init_from="):
            init_from = opt.split("=", 1)[1]
        elif opt.startswith("control="):
            control = opt.split("=", 1)[1]
        else:
            raise argparse.ArgumentTypeError(f"unknown system option '{opt}' in '{value}'; expected {SYSTEM_SYNTAX}")
    return TinySystem(name, Path(config), init_from, packed, control)


def _reloaded(value: str) -> ReloadedSystem:
    """``NAME=SOURCE:ENCODER``."""
    name, sep, rest = value.partition("=")
    source, colon, encoder = rest.partition(":")
    if not sep or not colon or not name or not source or not encoder:
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE:ENCODER, got '{value}'")
    return ReloadedSystem(name, source, encoder)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=Path, default=Path("exp/tiny"))
    p.add_argument("--system", type=_system, action="append", dest="systems",
                   help=f"{SYSTEM_SYNTAX} (repeatable; control: the equal-compute system this one is also "
                        "tested against); default: stock conformer, its fp32 fine-tune control and 8-/4-bit QAT "
                        "fine-tunes of the conformer exported packed")
    p.add_argument("--reload", type=_reloaded, action="append", dest="reloaded",
                   help="NAME=SOURCE:ENCODER (repeatable): no training, decode SOURCE's checkpoint with its config's "
                        "encoder swapped to ENCODER; default with the default systems: "
                        "elastic_conformer=conformer:elastic_conformer")
    p.add_argument("--data_dir", type=Path, default=None,
                   help="your own corpus: a dir with train/, dev/, test/ Kaldi data dirs (wav.scp, text, utt2spk; "
                        "audio at the training configs' frontend_conf.fs); default: make the synthetic corpus")
    p.add_argument("--baseline", default=None, help="system the others are tested against (default: first)")
    p.add_argument("--seed", type=int, default=0, help="synthetic corpus seed")
    p.add_argument("--num_train", type=int, default=2000, help="synthetic corpus size")
    p.add_argument("--num_dev", type=int, default=150)
    p.add_argument("--num_test", type=int, default=300)
    p.add_argument("--nj", type=int, default=2, help="parallel corpus/decode jobs")
    p.add_argument("--train_seed", type=int, default=None,
                   help="seed of every training (asr_train --seed; default: the configs' seed, 0); run the job "
                        "once per seed in separate --out_dir to report a spread")
    p.add_argument("--train_arg", action="append", default=[], dest="train_args",
                   help="extra asr_train argument, e.g. --train_arg=--max_epoch --train_arg=3")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    systems = args.systems or list(DEFAULT_SYSTEMS)
    reloaded = args.reloaded or ([] if args.systems else list(DEFAULT_RELOADED))
    cfg = TinyRunConfig(
        out_dir=args.out_dir, systems=systems, reloaded=reloaded, baseline=args.baseline or systems[0].name,
        seed=args.seed, num_train=args.num_train, num_dev=args.num_dev, num_test=args.num_test, nj=args.nj,
        train_args=args.train_args + ([] if args.train_seed is None else ["--seed", str(args.train_seed)]),
        data_dir=args.data_dir,
    )
    try:
        table = run_tiny(cfg)
    except (ValueError, FileNotFoundError) as err:  # a DataDirError is a ValueError
        print(f"run_tiny: {err}", file=sys.stderr)
        return 2
    print(table.to_markdown())
    print(f"report: {Path(args.out_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
