"""Validate Kaldi-style data directories; exit 1 if any is malformed.

Usage:
    python -m espnet_compress.bin.validate_data DIR [DIR ...]
    python -m espnet_compress.bin.validate_data --config conf/spoken_commands/train_asr_conformer_tiny.yaml DIR
    python -m espnet_compress.bin.validate_data --corpus --fs 16000 CORPUS   # CORPUS/{train,dev,test}

With ``--config`` (the rate is the config's ``frontend_conf.fs``) or ``--fs``, every audio file's
header is read too: readable audio, mono, at that rate. ``--corpus`` takes each argument as a corpus
root whose train/dev/test subsets are data dirs: what ``run_tiny --data_dir`` and the benchmarks accept.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from espnet_compress.corpus.kaldi_dir import DataDirError, SampleRate, validate_corpus_dir, validate_data_dir
from espnet_compress.pipeline.data import frontend_sample_rate


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dirs", nargs="+", metavar="DIR")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--config", type=Path, help="training config whose frontend_conf.fs the audio must have")
    rate.add_argument("--fs", type=int, help="sample rate (Hz) the audio must have")
    parser.add_argument("--corpus", action="store_true", help="each DIR holds train/, dev/ and test/ data dirs")
    args = parser.parse_args(argv)
    try:
        sample_rate = (frontend_sample_rate(args.config) if args.config is not None
                       else SampleRate(args.fs, "--fs") if args.fs is not None else None)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    status = 0
    for data_dir in args.data_dirs:
        try:
            if args.corpus:
                counts = validate_corpus_dir(data_dir, sample_rate)
                print(f"{data_dir}: OK ({', '.join(f'{name} {n}' for name, n in counts.items())} utterances)")
            else:
                print(f"{data_dir}: OK ({validate_data_dir(data_dir, sample_rate)} utterances)")
        except DataDirError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
