"""Export a trained quantization-aware ASR model as a packed low-bit model for stock ESPnet inference.

Usage:
    python -m espnet_compress.bin.export_packed --asr_train_config exp/x/config.yaml \\
        --asr_model_file exp/x/valid.acc.best.pth --out_dir exp/x/packed \\
        [--fp_dtype float32|float16] [--scale_dtype float32|float16]

Writes OUT_DIR/{model.packed.pth, config.yaml, size_report.json, size_report.md, model.packed.zip}
and prints the size report. Decode with the stock programs, e.g.
``python -m espnet2.bin.asr_inference --asr_train_config OUT_DIR/config.yaml
--asr_model_file OUT_DIR/model.packed.pth ...``, or unpack the zip with ``Speech2Text.from_pretrained``.
Exit status: 0 ok, 2 unusable input (the message names the file or option).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from espnet_compress.export import ExportError, export_packed

DTYPES = ("float32", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_compress.bin.export_packed",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--asr_train_config", type=Path, required=True, help="training config.yaml")
    parser.add_argument("--asr_model_file", type=Path, required=True, help="QAT checkpoint, e.g. valid.acc.best.pth")
    parser.add_argument("--out_dir", type=Path, required=True, help="export directory (created or updated)")
    parser.add_argument("--fp_dtype", choices=DTYPES, default="float32",
                        help="storage dtype of the tensors that are not quantized")
    parser.add_argument("--scale_dtype", choices=DTYPES, default="float32",
                        help="storage dtype of quantization scales")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = export_packed(args.asr_train_config, args.asr_model_file, args.out_dir,
                               fp_dtype=args.fp_dtype, scale_dtype=args.scale_dtype)
    except ExportError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(result.size_report_md.read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
