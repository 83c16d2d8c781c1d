"""Derive the architecture a DARTS search chose (``encoder_conf.search``) as a model of its own.

Usage::

    python -m espnet_compress.bin.derive_search --asr_train_config exp/search2/config.yaml \\
        --asr_model_file exp/search2/valid.acc.best.pth --out_dir exp/derived

writes ``config.yaml`` (per-block, per-FFN widths and bottlenecks under ``encoder_conf.search.fixed``,
or a stock ``conformer`` for a uniform unfactorised answer), ``model.pth`` (the supernet's weights
cut to the pick) and ``derive.json``. Fine-tune it with the stock trainer::

    python -m espnet2.bin.asr_train --config exp/derived/config.yaml --init_param exp/derived/model.pth ...
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from espnet_compress.export.search_export import derive_search


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asr_train_config", type=Path, required=True, help="the search's config.yaml (stage 2)")
    p.add_argument("--asr_model_file", type=Path, required=True, help="its checkpoint")
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--schedule_config", type=Path, default=None,
                   help="config whose epochs/optimiser/scheduler the derived model trains with (default: the "
                        "stage-1 config, found through the stage-2 run's init_param)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for path in (args.asr_train_config, args.asr_model_file):
        if not path.is_file():
            print(f"derive_search: {path} does not exist", file=sys.stderr)
            return 2
    try:
        res = derive_search(args.asr_train_config, args.asr_model_file, args.out_dir,
                            schedule_config=args.schedule_config)
    except ValueError as err:
        print(f"derive_search: {err}", file=sys.stderr)
        return 2
    kind = "stock ESPnet conformer" if res.stock else "elastic_conformer with search.fixed"
    print(f"{kind}: {res.num_params:,} parameters (supernet {res.supernet_params:,}); {res.config}, {res.model_file}")
    for name, per_block in res.architecture.get("width", {}).items():
        print(f"  width {name}: {per_block}")
    for name, per_block in res.architecture.get("rank", {}).items():
        print(f"  rank  {name}: {per_block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
