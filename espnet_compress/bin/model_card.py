"""Write the model card of one system beside its zip: numbers from the comparison report.

Usage::

    python -m espnet_compress.bin.model_card --compare_dir exp/compare --system int4 \\
        --zip exp/asr_<tag>/asr_<tag>_valid.acc.best.packed.zip [--out CARD.md]

The card (default: the zip's path with ``.md``) takes WER, MAPSSWE verdict, decode speed,
parameters and bytes from ``<compare_dir>/compare.json`` and checks that the zip holds the
checkpoint that report scored (see :mod:`espnet_compress.export.model_card`).
Exit status: 0 ok, 2 inputs that do not fit together (the message names the file and the fix).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from espnet_compress.export.model_card import ModelCardError, write_model_card


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m espnet_compress.bin.model_card",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare_dir", type=Path, required=True, help="out_dir of espnet_compress.bin.compare")
    parser.add_argument("--system", required=True, help="the system's name in that comparison")
    parser.add_argument("--zip", type=Path, required=True, help="the model zip (asr.sh stage 14)")
    parser.add_argument("--out", type=Path, help="card path (default: the zip's path with .md)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        out = write_model_card(args.compare_dir, args.system, args.zip, args.out,
                               command=[*parser.prog.split(), *argv])
    except ModelCardError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
