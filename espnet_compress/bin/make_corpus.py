"""Generate the synthetic spoken_commands corpus as Kaldi data dirs.

Usage: python -m espnet_compress.bin.make_corpus --out_dir DIR [--seed 0]
       [--num_train 2000] [--num_dev 150] [--num_test 300] [--nj 2] [--force]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

from espnet_compress.corpus.spoken_commands import DEFAULT_COUNTS, generate_corpus
from espnet_compress.utils.tools import MissingToolError


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True, help="creates OUT/{train,dev,test} and OUT/wav")
    parser.add_argument("--seed", type=int, default=0, help="everything (voice split, audio) derives from it")
    for split, count in DEFAULT_COUNTS.items():
        parser.add_argument(f"--num_{split}", type=int, default=count, help=f"{split} utterances")
    parser.add_argument("--nj", type=int, default=2, help="worker processes (output does not depend on it)")
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching corpus exists")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        reports = generate_corpus(
            args.out_dir,
            seed=args.seed,
            num_train=args.num_train,
            num_dev=args.num_dev,
            num_test=args.num_test,
            nj=args.nj,
            force=args.force,
            progress=not args.no_progress,
        )
    except (MissingToolError, ValueError) as err:
        print(f"make_corpus: error: {err}", file=sys.stderr)
        return 1
    for report in reports:
        state = "reused" if report.reused else "generated"
        print(f"{report.data_dir}: {report.num_utterances} utterances, {report.num_speakers} speakers ({state})")
    print(f"elapsed: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
