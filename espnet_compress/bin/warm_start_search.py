"""Warm-start a DARTS supernet (``encoder_conf.search``) from a trained dense model.

Usage::

    python -m espnet_compress.bin.warm_start_search --dense_config exp/asr_conformer/config.yaml \\
        --dense_model exp/asr_conformer/valid.acc.ave.pth \\
        --search_config conf/spoken_commands/train_asr_searchable_conformer_tiny_both_stage1.yaml \\
        --out exp/warm_both.pth
    python -m espnet2.bin.asr_train --config <the stage-1 config> --init_param exp/warm_both.pth ...

Width candidates start as prefixes of the dense FFNs; low-rank bottlenecks as the truncated SVD of
the dense weights, so every nested bottleneck is the best approximation of its rank and the
semi-orthogonal factors start on the constraint. Stage 1 then trains a few epochs instead of
training the supernet from scratch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from espnet_compress.export.search_export import warm_start_search


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense_config", type=Path, required=True, help="the dense model's training config.yaml")
    p.add_argument("--dense_model", type=Path, required=True, help="its checkpoint")
    p.add_argument("--search_config", type=Path, required=True, help="the stage-1 (weights) config of the search")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write, for asr_train --init_param")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for path in (args.dense_config, args.dense_model, args.search_config):
        if not path.is_file():
            print(f"warm_start_search: {path} does not exist", file=sys.stderr)
            return 2
    try:
        out = warm_start_search(args.dense_config, args.dense_model, args.search_config, args.out)
    except (KeyError, ValueError) as err:
        print(f"warm_start_search: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
