"""Does the CPU path change what a packed model recognises? WER of each kernel vs the dequantized path.

``dequant`` computes with exactly the file's codes x scales in fp32; ``qdyn`` (the int8 x int8
GEMM that makes decoding faster, see ``benchmarks/speed.py``) also rounds every activation of its
layers to 8 bits per call. This benchmark decodes the main job's packed QAT systems with stock
``asr_inference`` under ``ESPNET_COMPRESS_KERNEL=dequant`` and under each other kernel (forced: on
the tiny model ``auto`` keeps small layers on the exact path, so forcing is what exercises the
rounding), and tests each against the ``dequant`` decode with MAPSSWE. It also counts the
utterances whose hypothesis changed and lists the layers each kernel ran (from the decode logs).

Usage::

    .venv/bin/python benchmarks/kernel_wer.py --exp_dir exp/tiny [--systems qat_8bit qat_4bit] [--kernels qdyn]

Needs the main job's packed systems (``<exp_dir>/asr_<system>/packed``). Outputs
``<exp_dir>/benchmarks/kernel_wer.{md,json}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from nested_supernet import add_common_args, begin, prepare_corpus, save_report, tagged  # noqa: E402

from espnet_compress.env import KERNEL  # noqa: E402
from espnet_compress.export.packed_export import PACKED_NAME  # noqa: E402
from espnet_compress.quant.inference import KERNELS  # noqa: E402
from espnet_compress.scoring.compare import SystemSpec, compare, verdict_text  # noqa: E402

REFERENCE = "dequant"
PATHS_LINE = re.compile(r"espnet_compress inference paths \(kernel=[^;]+; [^)]*\): (.*)")


def _hypotheses(decode_dir: Path) -> Dict[str, str]:
    lines = (decode_dir / "test" / "text").read_text().splitlines()
    return dict((ln.split(maxsplit=1) + [""])[:2] for ln in lines if ln.strip())


def _paths(decode_dir: Path) -> str:
    """The layer paths the first decode job logged (every job loads the same file the same way)."""
    log_file = decode_dir / "test" / "logdir" / "asr_inference.1.log"
    found = PATHS_LINE.findall(log_file.read_text(errors="replace")) if log_file.exists() else []
    return found[-1] if found else "not logged"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--systems", nargs="+", default=["qat_8bit", "qat_4bit"],
                   help="main-job systems with a packed export (asr_<system>/packed)")
    p.add_argument("--kernels", nargs="+", default=["qdyn"], choices=[k for k in KERNELS if k != REFERENCE],
                   help=f"kernels to test against '{REFERENCE}'")
    args = p.parse_args(argv)
    begin(args)
    exp_dir = args.exp_dir.resolve()
    missing = [s for s in args.systems if not (exp_dir / f"asr_{s}" / "packed" / PACKED_NAME).is_file()]
    if missing:
        raise SystemExit(f"kernel_wer: no packed model for {missing} under {exp_dir} "
                         f"(expected asr_<system>/packed/{PACKED_NAME}); run the main job first")
    template = prepare_corpus(args)
    rows = []
    for system in args.systems:
        packed = exp_dir / f"asr_{system}" / "packed"
        exp = dataclasses.replace(template, exp_dir=packed, inference_model=PACKED_NAME)
        decodes = {k: tagged(exp, f"kernel_{k}", {KERNEL: k}) for k in (REFERENCE, *args.kernels)}
        for decode in decodes.values():
            decode.decode()
        table = compare([SystemSpec(k, d.decode_dir(), packed / PACKED_NAME) for k, d in decodes.items()], REFERENCE,
                        template.data_dir, ["test"], packed / "kernel_compare")
        reference_hyps = _hypotheses(decodes[REFERENCE].decode_dir())
        for row in table.rows:
            kernel = row.spec.name
            hyps = _hypotheses(decodes[kernel].decode_dir())
            sig = row.significance["test"]
            rows.append({"system": system, "kernel": kernel, "wer": row.wer["test"].wer,
                         "changed": sum(hyps.get(u) != h for u, h in reference_hyps.items()),
                         "utterances": len(reference_hyps), "verdict": verdict_text(sig),
                         "p_value": None if sig is None else sig.p_value, "paths": _paths(decodes[kernel].decode_dir())})
    lines = ["# WER by CPU path of the packed models", "",
             f"Each packed file decoded by stock `asr_inference` with `{KERNEL}` forced; MAPSSWE against the "
             f"`{REFERENCE}` decode of the same file ('lossless' = no significant difference, alpha 0.05).", "",
             "| system | kernel | WER | vs dequant | hypotheses changed | layers per path |", "|---|---|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['kernel']} | {r['wer']:.2f}% | {r['verdict']} | "
                     f"{r['changed']} / {r['utterances']} | {r['paths']} |")
    save_report(exp_dir / "benchmarks", "kernel_wer", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
