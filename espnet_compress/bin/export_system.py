"""Export one system of a multi-system (all-in-one / foldable) model as a standalone ESPnet model.

Usage::

    python -m espnet_compress.bin.export_system --asr_train_config exp/x/config.yaml \
        --asr_model_file exp/x/valid.acc.best.pth --system shallow --out_dir exp/x/systems/shallow

A full-precision system of uniform shape becomes a stock ESPnet ``conformer`` (loads without this
plugin); a quantized one becomes a packed checkpoint. ``--system all`` exports every system.
``--plan`` exports any plan instead of a declared system, e.g. a foldable seed at a chosen depth
and path (``--plan '{"depth": 3, "path_index": 1}'``) or a layer-skipped model (``'{"blocks": [0, 2]}'``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from espnet_compress.export.system_export import export_system


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
    p.add_argument("--asr_train_config", type=Path, required=True)
    p.add_argument("--asr_model_file", type=Path, required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--system", help="system name, or 'all'")
    which.add_argument("--plan", type=_plan, help="JSON plan to export instead of a declared system")
    p.add_argument("--out_dir", type=Path, required=True, help="with --system all: one sub-directory per system")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for path in (args.asr_train_config, args.asr_model_file):
        if not path.is_file():
            print(f"export_system: {path} does not exist", file=sys.stderr)
            return 2
    try:
        if args.plan is not None:
            results = [export_system(args.asr_train_config, args.asr_model_file, None, args.out_dir, plan=args.plan)]
        elif args.system == "all":
            import yaml

            names = list((yaml.safe_load(args.asr_train_config.read_text()).get("model_conf") or {}).get("systems") or {})
            if not names:
                raise ValueError(f"{args.asr_train_config}: no model_conf.systems to export")
            results = [export_system(args.asr_train_config, args.asr_model_file, n, args.out_dir / n) for n in names]
        else:
            results = [export_system(args.asr_train_config, args.asr_model_file, args.system, args.out_dir)]
    except ValueError as err:
        print(f"export_system: {err}", file=sys.stderr)
        return 2
    for r in results:
        kind = "stock ESPnet conformer" if r.stock else ("packed" if r.packed else "espnet_compress")
        print(f"{r.system}: {kind}, {r.num_params:,} parameters, {r.model_file} ({r.model_file.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
