"""Compare compressed ASR systems with a baseline: size, sclite WER and MAPSSWE significance.

Usage:
    python -m espnet_compress.bin.compare --ref_dir data --test_sets test [dev ...] \\
        --baseline NAME --system NAME DECODE_DIR [MODEL_FILE] [--system ...] \\
        --out_dir DIR [--alpha 0.05]

DECODE_DIR holds ``<test_set>/text`` for every test set (the ESPnet inference dir); references are
``<ref_dir>/<test_set>/text``. Writes DIR/compare.md, DIR/compare.json and DIR/command.sh (this
command line, which model cards quote) and prints the Markdown.
Exit status: 0 ok, 2 bad input (the message names what is wrong), 1 missing tool / scoring failure.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from espnet_compress.scoring.compare import SystemSpec, compare
from espnet_compress.scoring.sclite import ScoringInputError
from espnet_compress.utils.io import atomic_write_text
from espnet_compress.utils.tools import MissingToolError


def _alpha(value: str) -> float:
    alpha = float(value)
    if not 0.0 < alpha < 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in (0, 1), got {value}")
    return alpha


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_compress.bin.compare",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ref_dir", type=Path, required=True, help="data dir holding <test_set>/text")
    parser.add_argument("--test_sets", nargs="+", required=True, metavar="TEST_SET")
    parser.add_argument("--baseline", required=True, help="name of the reference system (one of --system)")
    parser.add_argument(
        "--system",
        nargs="+",
        action="append",
        required=True,
        metavar="ARG",
        help="NAME DECODE_DIR [MODEL_FILE]; repeat once per system",
    )
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--alpha", type=_alpha, default=0.05, help="significance level (two-sided)")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def parse_systems(parser: argparse.ArgumentParser, raw: List[List[str]]) -> List[SystemSpec]:
    """``--system`` takes 2 or 3 values; argparse has no such nargs, so check here (exits 2)."""
    specs = []
    for values in raw:
        if len(values) not in (2, 3):
            parser.error(
                f"--system takes NAME DECODE_DIR [MODEL_FILE], got {len(values)} value(s): "
                + " ".join(values)
            )
        model_file = Path(values[2]) if len(values) == 3 else None
        specs.append(SystemSpec(name=values[0], decode_dir=Path(values[1]), model_file=model_file))
    return specs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    systems = parse_systems(parser, args.system)
    try:
        table = compare(systems, args.baseline, args.ref_dir, args.test_sets, args.out_dir, alpha=args.alpha)
    except ScoringInputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except MissingToolError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    atomic_write_text(args.out_dir / "command.sh", shlex.join([*parser.prog.split(), *argv]) + "\n")
    print(table.to_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
