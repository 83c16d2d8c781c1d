"""Decode every system of one multi-system model through a recipe's asr.sh, each under its own tag.

Usage (in the recipe directory, after training)::

    python -m espnet_compress.bin.decode_systems --asr_exp exp/asr_<tag> [--systems full depth3 ...] \\
        -- ./run.sh --asr_config conf/<the training config>.yaml --stage 12 --stop_stage 13

For each system the recipe command runs with ``ESPNET_COMPRESS_SYSTEM=<system>`` (the model builds
that system; an unknown name stops the build) and ``--inference_tag decode_system_<system>``
appended, so asr.sh writes ``<asr_exp>/decode_system_<system>/<test_set>/`` and no decode overwrites
another (asr.sh's default tag names only the config and the checkpoint). Names are checked against
the config's ``model_conf.systems`` before anything runs. Each decode dir gets
``decode_systems.json`` (system, command, environment) for the model card. At the end the
``compare`` command that scores them all against the largest system is printed (and written to
``<asr_exp>/compare_systems.sh``).

Exit status: 0 ok, 2 bad input (unknown system, no systems, tag given twice), else the failing
recipe command's status.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from espnet_compress.env import SYSTEM as SYSTEM_ENV  # read by the model at build time
from espnet_compress.export.asr_exp import DEFAULT_MODEL, declared_systems
from espnet_compress.utils.io import atomic_write_text

#: The file each decode dir receives.
DECODE_RECORD = "decode_systems.json"


def inference_tag(system: str) -> str:
    """asr.sh ``--inference_tag`` of ``system``'s decode (a directory name under the experiment)."""
    return f"decode_system_{system}"


def compare_command(asr_exp: Path, systems: Sequence[str], test_sets: Sequence[str], model_name: str,
                    ref_dir: str = "data") -> List[str]:
    """``python -m espnet_compress.bin.compare`` over the systems' decode dirs, the first (largest)
    system as the baseline; the model file is the one all systems were decoded from."""
    cmd = ["python", "-m", "espnet_compress.bin.compare", "--ref_dir", ref_dir, "--test_sets", *test_sets,
           "--baseline", systems[0]]
    for name in systems:
        cmd += ["--system", name, str(asr_exp / inference_tag(name)), str(asr_exp / model_name)]
    return cmd + ["--out_dir", str(asr_exp / "compare_systems")]


def decoded_test_sets(decode_dir: Path) -> List[str]:
    """Test sets asr.sh wrote hypotheses for (``<decode_dir>/<test_set>/text``)."""
    return sorted(p.parent.name for p in decode_dir.glob("*/text"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, recipe = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m espnet_compress.bin.decode_systems",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Everything after -- is the recipe command (asr.sh or run.sh with its options).",
    )
    parser.add_argument("--asr_exp", type=Path, required=True, help="asr.sh experiment dir of the model")
    parser.add_argument("--systems", nargs="+", help="systems to decode (default: every declared system)")
    parser.add_argument("--inference_asr_model", default=DEFAULT_MODEL,
                        help="checkpoint inside --asr_exp, as asr.sh's option (also passed to the recipe)")
    parser.add_argument("--ref_dir", default="data", help="reference data dir of the printed compare command")
    args = parser.parse_args(ours)
    if not recipe:
        parser.error("give the recipe command after --, e.g. -- ./run.sh --asr_config conf/x.yaml --stage 12 "
                     "--stop_stage 13")
    if "--inference_tag" in recipe:
        parser.error("the recipe command must not set --inference_tag: every system gets its own "
                     f"({inference_tag('<system>')})")
    config = args.asr_exp / "config.yaml"
    if not config.is_file():
        parser.error(f"{config} does not exist: give the experiment dir asr.sh's stage 11 wrote")
    declared = declared_systems(config)
    if not declared:
        parser.error(f"{config} declares no model_conf.systems: a single-system model has one decode "
                     "(run asr.sh as usual)")
    systems = args.systems or declared
    unknown = [s for s in systems if s not in declared]
    if unknown:
        parser.error(f"unknown system(s) {unknown}: {config} declares {declared}")

    for name in systems:
        cmd = [*recipe, "--inference_asr_model", args.inference_asr_model, "--inference_tag", inference_tag(name)]
        print(f"[decode_systems] {SYSTEM_ENV}={name} {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env={**os.environ, SYSTEM_ENV: name})
        if rc != 0:
            print(f"[decode_systems] system {name!r}: the recipe command failed with status {rc}", file=sys.stderr)
            return rc
        decode_dir = args.asr_exp / inference_tag(name)
        if not decode_dir.is_dir():
            print(f"[decode_systems] system {name!r}: the recipe command wrote no {decode_dir}; does it run "
                  f"asr.sh's stage 12 for {args.asr_exp}?", file=sys.stderr)
            return 2
        record = {"system": name, "env": {SYSTEM_ENV: name}, "command": cmd}
        atomic_write_text(decode_dir / DECODE_RECORD, json.dumps(record, indent=2) + "\n")

    test_sets = decoded_test_sets(args.asr_exp / inference_tag(systems[0]))
    if not test_sets:
        print(f"[decode_systems] no <test_set>/text in {args.asr_exp / inference_tag(systems[0])}: the recipe "
              "command must run asr.sh's stage 12 (e.g. --stage 12 --stop_stage 13)", file=sys.stderr)
        return 2
    compare = shlex.join(compare_command(args.asr_exp, systems, test_sets, args.inference_asr_model, args.ref_dir))
    atomic_write_text(args.asr_exp / "compare_systems.sh", compare + "\n")
    print(f"[decode_systems] score them all:\n{compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
