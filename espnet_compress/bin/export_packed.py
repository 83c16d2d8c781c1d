"""Export a trained quantization-aware ASR model as a packed low-bit model for stock ESPnet inference.

Usage:
    python -m espnet_compress.bin.export_packed --asr_train_config exp/x/config.yaml \\
        --asr_model_file exp/x/valid.acc.best.pth --out_dir exp/x/packed \\
        [--fp_dtype float32|float16] [--scale_dtype float32|float16] [--ternary_packing bits|trits]
    python -m espnet_compress.bin.export_packed --asr_exp exp/asr_<tag> [--asr_model_file valid.acc.best.pth]

Writes OUT_DIR/{model.packed.pth, config.yaml, size_report.json, size_report.md, model.packed.zip}
and prints the size report. With ``--asr_exp`` (an asr.sh experiment dir) OUT_DIR is
``<asr_exp>/packed`` and the packed file is also placed as ``<asr_exp>/valid.acc.best.packed.pth``,
so that ``asr.sh --stage 12 --inference_asr_model valid.acc.best.packed.pth --skip_packing false``
decodes it and packs it into the model zip (see :mod:`espnet_compress.export.asr_exp`). Decode with the stock programs, e.g.
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
from espnet_compress.export.asr_exp import DEFAULT_MODEL, export_packed_to_exp
from espnet_compress.quant.bitpack import PACKINGS

DTYPES = ("float32", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_compress.bin.export_packed",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--asr_exp", type=Path,
                        help="asr.sh experiment dir: export into it in the layout asr.sh decodes and packs "
                             "(instead of --asr_train_config/--out_dir)")
    parser.add_argument("--asr_train_config", type=Path, help="training config.yaml")
    parser.add_argument("--asr_model_file", type=Path,
                        help=f"QAT checkpoint; with --asr_exp a file name inside it (default {DEFAULT_MODEL})")
    parser.add_argument("--out_dir", type=Path, help="export directory (created or updated)")
    parser.add_argument("--fp_dtype", choices=DTYPES, default="float32",
                        help="storage dtype of the tensors that are not quantized")
    parser.add_argument("--scale_dtype", choices=DTYPES, default="float32",
                        help="storage dtype of quantization scales")
    parser.add_argument("--ternary_packing", choices=PACKINGS, default="bits",
                        help="layout of 2-bit (ternary) codes: bits = 4 per byte, trits = 5 per byte (1.6 bits)")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.asr_exp is not None and (args.asr_train_config or args.out_dir):
        parser.error("--asr_exp takes the config and the output dir from the experiment dir; "
                     "drop --asr_train_config/--out_dir")
    if args.asr_exp is None and not (args.asr_train_config and args.asr_model_file and args.out_dir):
        parser.error("give --asr_exp, or all of --asr_train_config, --asr_model_file and --out_dir")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.asr_exp is not None:
            placed = export_packed_to_exp(args.asr_exp, str(args.asr_model_file or DEFAULT_MODEL),
                                          fp_dtype=args.fp_dtype, scale_dtype=args.scale_dtype,
                                          ternary_packing=args.ternary_packing, command=["python", "-m", "espnet_compress.bin.export_packed", *argv])
            result = placed.export
        else:
            result = export_packed(args.asr_train_config, args.asr_model_file, args.out_dir,
                                   fp_dtype=args.fp_dtype, scale_dtype=args.scale_dtype,
                                   ternary_packing=args.ternary_packing)
    except ExportError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(result.size_report_md.read_text(encoding="utf-8"), end="")
    if args.asr_exp is not None:
        print(f"asr.sh: --asr_exp {args.asr_exp} --inference_asr_model {placed.inference_asr_model} "
              f"--stage 12 --skip_packing false")
    return 0


if __name__ == "__main__":
    sys.exit(main())
