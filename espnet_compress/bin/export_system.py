"""Export one system of a multi-system (all-in-one / foldable) model as a standalone ESPnet model.

Usage::

    python -m espnet_compress.bin.export_system --asr_train_config exp/x/config.yaml \
        --asr_model_file exp/x/valid.acc.best.pth --system shallow --out_dir exp/x/systems/shallow

A full-precision system of uniform shape becomes a stock ESPnet ``conformer`` (loads without this
plugin); a quantized one becomes a packed checkpoint. ``--system all`` exports every system.
``--plan`` exports any plan instead of a declared system, e.g. a foldable seed at a chosen depth
and path (``--plan '{"depth": 3, "path_index": 1}'``) or a layer-skipped model (``'{"blocks": [0, 2]}'``).

In an asr.sh recipe, ``--asr_exp exp/asr_<tag> --system all`` writes each system into its own
experiment dir ``exp/asr_<tag>_<system>`` that asr.sh decodes and packs:
``asr.sh --asr_exp exp/asr_<tag>_<system> --inference_asr_model model.pth --stage 12 --skip_packing false``
(``model.packed.pth`` for a quantized system; see :mod:`espnet_compress.export.asr_exp`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from espnet_compress.export.asr_exp import DEFAULT_MODEL, declared_systems, export_systems_to_exp, system_exp_dir
from espnet_compress.export.system_export import SystemExport, export_system


def _plan(text: str) -> Dict[str, Any]:
    try:
        plan = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(plan, dict):
        raise argparse.ArgumentTypeError(f"a plan is a JSON object such as '{{\"depth\": 3}}', got {text!r}")
    return plan


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asr_exp", type=Path,
                   help="asr.sh experiment dir: one experiment dir per system beside it (instead of "
                        "--asr_train_config/--out_dir)")
    p.add_argument("--asr_train_config", type=Path)
    p.add_argument("--asr_model_file", type=Path,
                   help=f"checkpoint; with --asr_exp a file name inside it (default {DEFAULT_MODEL})")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--system", nargs="+", help="system name(s), or 'all'")
    which.add_argument("--plan", type=_plan, help="JSON plan to export instead of a declared system")
    p.add_argument("--out_dir", type=Path, help="with --system all: one sub-directory per system")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.asr_exp is not None:
        if args.asr_train_config or args.out_dir or args.plan is not None:
            p.error("--asr_exp takes the config and the output dirs from the experiment dir and exports declared "
                    "systems; drop --asr_train_config/--out_dir/--plan")
        try:
            results = export_systems_to_exp(args.asr_exp, args.system, str(args.asr_model_file or DEFAULT_MODEL),
                                            command=["python", "-m", "espnet_compress.bin.export_system", *argv])
        except ValueError as err:  # ExportError, unknown system names
            print(f"export_system: {err}", file=sys.stderr)
            return 2
        _print(results)
        for r in results:
            print(f"asr.sh: --asr_exp {system_exp_dir(args.asr_exp, r.system)} --inference_asr_model "
                  f"{r.model_file.name} --stage 12 --skip_packing false")
        return 0
    if not (args.asr_train_config and args.asr_model_file and args.out_dir):
        p.error("give --asr_exp, or all of --asr_train_config, --asr_model_file and --out_dir")
    for path in (args.asr_train_config, args.asr_model_file):
        if not path.is_file():
            print(f"export_system: {path} does not exist", file=sys.stderr)
            return 2
    try:
        if args.plan is not None:
            results = [export_system(args.asr_train_config, args.asr_model_file, None, args.out_dir, plan=args.plan)]
        elif args.system == ["all"]:
            names = declared_systems(args.asr_train_config)
            if not names:
                raise ValueError(f"{args.asr_train_config}: no model_conf.systems to export")
            results = [export_system(args.asr_train_config, args.asr_model_file, n, args.out_dir / n) for n in names]
        elif len(args.system) == 1:
            results = [export_system(args.asr_train_config, args.asr_model_file, args.system[0], args.out_dir)]
        else:
            results = [export_system(args.asr_train_config, args.asr_model_file, n, args.out_dir / n)
                       for n in args.system]
    except ValueError as err:
        print(f"export_system: {err}", file=sys.stderr)
        return 2
    _print(results)
    return 0


def _print(results: List[SystemExport]) -> None:
    for r in results:
        kind = "stock ESPnet conformer" if r.stock else ("packed" if r.packed else "espnet_compress")
        print(f"{r.system}: {kind}, {r.num_params:,} parameters, {r.model_file} ({r.model_file.stat().st_size:,} bytes)")


if __name__ == "__main__":
    sys.exit(main())
