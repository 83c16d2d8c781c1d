"""Validate Kaldi-style data directories; exit 1 if any is malformed.

Usage: python -m espnet_compress.bin.validate_data DIR [DIR ...]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from espnet_compress.corpus.kaldi_dir import DataDirError, validate_data_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dirs", nargs="+", metavar="DIR")
    args = parser.parse_args(argv)
    status = 0
    for data_dir in args.data_dirs:
        try:
            print(f"{data_dir}: OK ({validate_data_dir(data_dir)} utterances)")
        except DataDirError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
