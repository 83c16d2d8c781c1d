"""Line up the same comparison run with several training seeds: WER per seed, mean, spread, and
the MAPSSWE verdict of each seed.

Usage::

    python -m espnet_compress.bin.run_tiny --out_dir exp/tiny_s0 --train_seed 0
    python -m espnet_compress.bin.run_tiny --out_dir exp/tiny_s1 --train_seed 1
    python -m espnet_compress.bin.seeds_report exp/tiny_s0 exp/tiny_s1 --out exp/seeds.md

Every ``compare.json`` below each run dir (the main job's ``compare``, ``compare_vs_<control>``, a
benchmark's ``compare``) is matched by its path inside the run; each becomes one table. The run dir
names label the seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from espnet_compress.scoring.seeds import collect, seed_table
from espnet_compress.utils.io import atomic_write_text


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="one dir per seed (a main-job --out_dir or a benchmark dir)")
    p.add_argument("--out", type=Path, required=True, help="markdown report; a .json twin is written beside it")
    p.add_argument("--test_set", default="test")
    args = p.parse_args(argv)
    if len({r.name for r in args.runs}) != len(args.runs):
        print("seeds_report: run dirs must have distinct names (they label the seeds)", file=sys.stderr)
        return 2
    try:
        tables = {rel: seed_table(runs, args.test_set) for rel, runs in collect(args.runs).items()}
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"seeds_report: {err}", file=sys.stderr)
        return 2
    lines = [f"# {len(args.runs)} seeds: {', '.join(r.name for r in args.runs)}", ""]
    for rel, table in tables.items():
        lines += [f"## `{rel}`: against `{table.baseline}`, test set `{table.test_set}`", "", table.to_markdown()]
    lines += ["sd: sample standard deviation over seeds. A verdict is MAPSSWE at alpha 0.05 within one seed's run; "
              "\"agree: NO\" means one run per cell would have told a different story.", ""]
    atomic_write_text(args.out, "\n".join(lines))
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({k: t.to_dict() for k, t in tables.items()}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
