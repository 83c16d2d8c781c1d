"""KL-chosen vs uniform, hand-set and random bit allocations after QAT on the tiny corpus.

Starts from a finished main job (``run_tiny``: the fp32 ``conformer``, its equal-compute control
``fp32_finetune`` and uniform ``qat_4bit``), then:

1. measures Omega_i(n) on ``--num_utts`` dev utterances (:mod:`espnet_compress.mixed_precision`,
   cached) and writes QAT configs, each the main job's 4-bit QAT config (same schedule and epochs)
   with a per-module ``bits`` map for encoder and decoder:

   * ``mp_kl4``: KL-chosen at 4.0 average bits (against uniform 4-bit ``qat_4bit``);
   * ``mp_hand``: hand-set, every FFN at 2 bits and everything else at 3 (about 2.5 average bits);
   * ``mp_kl``: KL-chosen at exactly the hand-set's size;
   * ``mp_rand``: a random allocation of the same size (random widths, lowered at random until it fits);

2. trains and decodes them with ``run_tiny`` in ``--run_dir`` (a hard-linked copy of the main job,
   so finished stages are reused; ``--only`` trains a subset, e.g. two run dirs in parallel);
3. ``--report RUN_DIR ...``: one MAPSSWE table per reference (fp32 baseline, control, uniform,
   hand-set, random), WER and packed bytes.

Usage::

    python benchmarks/mixed_precision.py --main_job exp/tiny --out exp/mp --run_dir exp/mp/runA --only mp_kl4,mp_hand
    python benchmarks/mixed_precision.py --main_job exp/tiny --out exp/mp --run_dir exp/mp/runB --only mp_kl,mp_rand
    python benchmarks/mixed_precision.py --main_job exp/tiny --out exp/mp --report exp/mp/runA exp/mp/runB
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import yaml

from espnet_compress.mixed_precision.allocation import Allocation, Budget, Problem, solve, storage_bits
from espnet_compress.mixed_precision.sensitivity import (config_fragment, held_out_batches, load_or_measure,
                                                         merge_fragment)
from espnet_compress.pipeline.data import corpus_of
from espnet_compress.pipeline.tiny import CONF_DIR
from espnet_compress.utils.io import atomic_write_text
from main_job import run_beside_main_job  # benchmarks/ (the script's directory)

QAT_CONFIG = CONF_DIR / "train_asr_quantized_conformer_tiny_4bit.yaml"
SYSTEMS = ("mp_kl4", "mp_hand", "mp_kl", "mp_rand")
REUSED = ("token_list", "asr_stats", "asr_conformer", "asr_fp32_finetune", "asr_qat_4bit", "data_source.json")


def hand_set(problem: Problem) -> Dict[str, int]:
    """The rule a person would write: FFNs (the bulk of the weights) at 2 bits, the rest at 3."""
    return {n: 2 if ".feed_forward" in n and n.rsplit(".", 1)[-1] in ("w_1", "w_2") else 3 for n in problem.names}


def random_allocation(problem: Problem, limit_bits: int, seed: int) -> Dict[str, int]:
    """Random widths from the candidates, then random one-step lowerings until the size fits and
    random one-step raisings while it still fits: a random point just under the size."""
    rng = np.random.default_rng(seed)
    widths = sorted(w for w in problem.widths if w)
    idx = {n: int(rng.integers(len(widths))) for n in problem.names}
    params = dict(zip(problem.names, problem.params))

    def size() -> int:
        return sum(params[n] * storage_bits(widths[i]) for n, i in idx.items())

    while size() > limit_bits:
        n = rng.choice([n for n, i in idx.items() if i > 0])
        idx[n] -= 1
    for n in rng.permutation(problem.names):
        while idx[n] + 1 < len(widths):
            idx[n] += 1
            if size() > limit_bits:
                idx[n] -= 1
                break
    return {n: widths[i] for n, i in idx.items()}


def _config(bits: Dict[str, int], path: Path) -> Path:
    base = yaml.safe_load(QAT_CONFIG.read_text())
    conf = merge_fragment(base, config_fragment(bits, base["encoder"]))
    atomic_write_text(path, yaml.safe_dump(conf, sort_keys=False))  # two run dirs may prepare at once
    return path


def prepare(main_job: Path, out: Path, num_utts: int, seed: int) -> Dict[str, Path]:
    """Measure (or load) the sensitivities, choose the four allocations, write their configs."""
    from espnet2.tasks.asr import ASRTask

    exp = main_job / "asr_conformer"
    model, train_args = ASRTask.build_model_from_file(exp / "config.yaml", exp / "valid.acc.best.pth", "cpu")
    data = corpus_of(main_job) / "dev"
    batches, data_id = held_out_batches(data, train_args, num_utts)
    table = load_or_measure(out / "sensitivity.npz", model, batches, data_id=data_id)
    problem = table.problem()
    frontier = solve(problem)
    hand = hand_set(problem)
    limit = problem.size_bits(hand)
    chosen: Dict[str, Allocation] = {
        "mp_kl4": frontier.best_under(Budget(4.0)),
        "mp_hand": Allocation(hand, limit, problem.omega_of(hand), problem.num_weights),
        "mp_kl": frontier.best_under(Budget(limit, "bits")),
    }
    rand = random_allocation(problem, limit, seed)
    chosen["mp_rand"] = Allocation(rand, problem.size_bits(rand), problem.omega_of(rand), problem.num_weights)
    chosen["uniform4"] = problem.uniform(4)
    summary = {k: {"avg_bits": a.avg_bits, "omega": a.omega, "bits": a.bits} for k, a in chosen.items()}
    atomic_write_text(out / "allocations.json", json.dumps(summary, indent=1))
    for k, a in chosen.items():
        print(f"{k:9s} {a.avg_bits:.3f} average bits, sum of Omega {a.omega:.5g}")
    return {k: _config(chosen[k].bits, out / "conf" / f"{k}.yaml") for k in SYSTEMS}


def run(main_job: Path, run_dir: Path, configs: Dict[str, Path], only: List[str]) -> None:
    """``run_tiny`` with the main job's systems (reused) and the chosen new ones."""
    run_beside_main_job(main_job, run_dir, REUSED, {"qat_4bit": QAT_CONFIG, **{n: configs[n] for n in only}})


def report(runs: List[Path], out: Path) -> None:
    """Cross-run MAPSSWE tables: every mixed system against each reference."""
    from espnet_compress.scoring.compare import SystemSpec, compare

    specs: Dict[str, SystemSpec] = {}
    for run_dir in runs:
        data = json.loads((run_dir / "compare" / "compare.json").read_text())
        for s in data["systems"]:
            specs.setdefault(s["name"], SystemSpec(s["name"], Path(s["decode_dir"]), Path(s["model_file"])))
    corpus = corpus_of(runs[0])
    mixed = [n for n in SYSTEMS if n in specs]
    tables = []
    for ref, members in (("conformer", ["qat_4bit"] + mixed), ("fp32_finetune", ["qat_4bit"] + mixed),
                         ("qat_4bit", ["mp_kl4"]), ("mp_hand", ["mp_kl", "mp_rand"]), ("mp_rand", ["mp_kl"])):
        present = [m for m in members if m in specs]
        if ref in specs and present:
            table = compare([specs[ref]] + [specs[m] for m in present], ref, corpus, ["test"],
                            out / f"compare_vs_{ref}")
            tables.append(f"## Against `{ref}`\n\n" + table.to_markdown())
    text = "\n\n".join(tables)
    atomic_write_text(out / "report.md", text + "\n")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--main_job", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run_dir", type=Path)
    p.add_argument("--only", default=",".join(SYSTEMS))
    p.add_argument("--num_utts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="of the random allocation")
    p.add_argument("--report", type=Path, nargs="+")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args.report, args.out)
        return
    configs = prepare(args.main_job, args.out, args.num_utts, args.seed)
    if args.run_dir:
        only = [s for s in args.only.split(",") if s]
        unknown = sorted(set(only) - set(SYSTEMS))
        if unknown:
            sys.exit(f"--only: unknown system(s) {unknown}; allowed: {list(SYSTEMS)}")
        run(args.main_job, args.run_dir, configs, only)


if __name__ == "__main__":
    main()
