"""Foldable Conformer, Table-4 trends (arXiv 2505.21237) on the tiny spoken_commands corpus.

Five trainings (stock ``espnet2.bin.asr_train``, same epochs), each decoded at executed encoder
depths 2, 3 and 4 over every path to that depth, with stock ``asr_inference``:

============== ============================================ ===============================================
system         training                                     how other depths are executed
============== ============================================ ===============================================
baseline4      stock Conformer, 4 blocks (the fp32          folded: skip blocks; the checkpoint is decoded
               baseline, train_asr_conformer_tiny.yaml)     as ``elastic_conformer`` with
                                                            ``ESPNET_COMPRESS_PLAN='{"blocks": [...]}'``,
                                                            every subset of the 4 blocks (4 paths to 3, 6 to 2)
seed2_alone    stock Conformer, 2 blocks                    unfolded: decoded as ``foldable_conformer`` with
               (train_asr_conformer_tiny_2blocks.yaml)      ``'{"depth": d, "path_index": i}'``
seed2_depth4   2-block seed trained only at depth 4         folded back / other paths, same plans
               (..._foldable_conformer_tiny_depth4only)
joint          depth 4 + 0.25 x seed, no KL (..._nokl)      same plans
joint_kl       + 0.1 x KL(depth 4 || seed)                  same plans
               (train_asr_foldable_conformer_tiny.yaml)
============== ============================================ ===============================================

Paths to a depth >= 2 physical blocks come from ``espnet_compress.core.fold.enumerate_paths``
(unfolding rule; depth 3 from 2 blocks has 2 paths); the baseline's paths to depth < 4 are the
block subsets (layer skipping). The table shows, per system and depth, the WER of the median path
(the paper reports the median), the min-max over paths, and MAPSSWE of the median path vs the
4-block baseline at depth 4. The plot shows WER vs executed depth with the min-max band.

Usage::

    nice -n 19 .venv/bin/python benchmarks/foldable.py --exp_dir exp/tiny
    nice -n 19 .venv/bin/python benchmarks/foldable.py --exp_dir /tmp/bench_check \\
        --num_train 40 --num_dev 8 --num_test 12 --max_epoch 1 --max_paths 2

Restartable (finished trainings/decodes are reused). ``--train_only joint_kl`` trains one system and
stops, so several processes on one ``--exp_dir`` can share the cores; a last run without it decodes.
Outputs: ``<exp_dir>/benchmarks/foldable/`` (trainings, decodes, scoring) and
``<exp_dir>/benchmarks/foldable.{md,json}`` + ``foldable_wer_vs_depth.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nested_supernet import (  # noqa: E402
    BASELINE_CONFIG,
    CONF_DIR,
    TaggedDecode,
    TrainRecord,
    add_common_args,
    build_params,
    check_mirrors_baseline,
    begin,
    find_baseline,
    fmt_seconds,
    plot_setup,
    save_plot,
    prepare_corpus,
    tagged,
    timed_train,
)

from espnet_compress.core.fold import enumerate_paths  # noqa: E402
from espnet_compress.utils.io import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmark")


@dataclasses.dataclass(frozen=True)
class FoldSystem:
    name: str
    config: Path
    physical: int
    decode_encoder: str  # encoder the checkpoint is decoded as (plans need an elastic/foldable one)
    label: str


SYSTEMS: Tuple[FoldSystem, ...] = (
    FoldSystem("baseline4", BASELINE_CONFIG, 4, "elastic_conformer", "4 blocks trained alone (fold by skipping)"),
    FoldSystem("seed2_alone", CONF_DIR / "train_asr_conformer_tiny_2blocks.yaml", 2, "foldable_conformer",
               "2-block seed trained alone"),
    FoldSystem("seed2_depth4", CONF_DIR / "train_asr_foldable_conformer_tiny_depth4only.yaml", 2,
               "foldable_conformer", "seed trained only at depth 4"),
    FoldSystem("joint", CONF_DIR / "train_asr_foldable_conformer_tiny_nokl.yaml", 2, "foldable_conformer",
               "joint L_F4 + 0.25 L_P2"),
    FoldSystem("joint_kl", CONF_DIR / "train_asr_foldable_conformer_tiny.yaml", 2, "foldable_conformer",
               "joint + 0.1 KL"),
)


def paths_for(system: FoldSystem, depth: int) -> List[Tuple[int, ...]]:
    """Every way to execute ``system`` at ``depth``: block subsets below the physical depth, the
    unfolding rule's paths at or above it."""
    if depth < system.physical:
        return list(itertools.combinations(range(system.physical), depth))
    return enumerate_paths(system.physical, depth)


def plan_for(system: FoldSystem, depth: int, index: int, path: Tuple[int, ...]) -> Dict:
    if depth < system.physical or system.decode_encoder == "elastic_conformer":
        return {"blocks": list(path)}
    return {"depth": depth, "path_index": index}


def pick(n: int, k: Optional[int]) -> List[int]:
    """``k`` evenly spaced indices of ``n`` (all when k is None or >= n), always including 0."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def decode_config(exp_dir: Path, encoder: str, out: Path) -> Path:
    """The trained ``config.yaml`` with the encoder renamed (a stock Conformer's checkpoint loads
    into ``elastic_conformer``/``foldable_conformer`` unchanged), so a plan can run it."""
    conf = yaml.safe_load((exp_dir / "config.yaml").read_text())
    if conf["encoder"] == encoder or (encoder == "elastic_conformer" and conf["encoder"] == "foldable_conformer"):
        return exp_dir / "config.yaml"
    conf["encoder"] = encoder
    atomic_write_text(out, yaml.safe_dump(conf, sort_keys=False))
    return out


@dataclasses.dataclass
class Cell:
    system: str
    depth: int
    paths: List[List[int]]
    wers: List[float]
    median_index: int
    median_path: List[int]
    median_wer: float
    std: float
    verdict: str = ""
    p_value: Optional[float] = None
    rel_to_baseline: Optional[float] = None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4], help="executed encoder depths")
    p.add_argument("--max_paths", type=int, default=None,
                   help="decode at most this many (evenly spread) paths per depth; default: all")
    p.add_argument("--systems", nargs="+", choices=[s.name for s in SYSTEMS], default=None,
                   help="train and report just these systems (default: all; the report always includes its "
                        "reference baseline4), e.g. a further seed of only the rows whose seeds disagree")
    p.add_argument("--train_only", action="store_true",
                   help="train exactly the --systems, then stop: run one process per system on the same --exp_dir "
                        "to use several cores, then once more without it to decode and score")
    args = p.parse_args(argv)
    chosen = [s for s in SYSTEMS if args.systems is None or s.name in args.systems
              or (s.name == "baseline4" and not args.train_only)]
    train_args = begin(args)
    exp_dir = args.exp_dir.resolve()
    bench = exp_dir / "benchmarks" / "foldable"
    out = exp_dir / "benchmarks"
    drift = {s.config.name: check_mirrors_baseline(s.config) for s in chosen}
    drift = {k: v for k, v in drift.items() if v}
    if drift:
        log.warning("configs differ from %s outside encoder/model: %s", BASELINE_CONFIG.name, drift)

    template = prepare_corpus(args)
    exps = {s.name: dataclasses.replace(template, exp_dir=bench / f"asr_{s.name}", train_config=s.config.resolve(),
                                        train_args=train_args) for s in SYSTEMS}
    found = find_baseline(exp_dir, args.max_epoch, exps["baseline4"].inference_model)
    if found is not None:
        log.info("reusing the fp32 baseline %s", found)
        exps["baseline4"] = dataclasses.replace(exps["baseline4"], exp_dir=found)

    records: Dict[str, TrainRecord] = {}
    for s in tqdm(chosen, desc="train", unit="model"):
        records[s.name] = timed_train(s.name, exps[s.name], args.max_epoch)
    if args.train_only:
        log.info("trained %s (--train_only); run again without it to decode and score", [s.name for s in chosen])
        return 0

    # ---- decode every (system, depth, path)
    jobs: List[Tuple[FoldSystem, int, int, Tuple[int, ...], TaggedDecode]] = []
    for s in chosen:
        exp = exps[s.name]
        config = decode_config(exp.exp_dir, s.decode_encoder, bench / "decode_configs" / f"{s.name}.yaml")
        override = None if config == exp.exp_dir / "config.yaml" else config
        for depth in args.depths:
            options = paths_for(s, depth)
            for i in pick(len(options), args.max_paths):
                plan = plan_for(s, depth, i, options[i])
                tag = f"d{depth}_p{i}"
                env = {"ESPNET_COMPRESS_PLAN": json.dumps(plan)}
                # decodes live in this benchmark's dir even when the baseline training is reused
                jobs.append((s, depth, i, options[i], tagged(exp, tag, env, override, bench / f"asr_{s.name}")))
    for s, depth, i, path, dec in tqdm(jobs, desc="decode", unit="plan"):
        dec.decode()

    # ---- score every decode; MAPSSWE of each median path vs the baseline at full depth
    from espnet_compress.scoring.compare import SystemSpec, compare, verdict_text
    from espnet_compress.scoring.sclite import score

    ref = template.data_dir / "test" / "text"
    wer: Dict[Tuple[str, int, int], float] = {}
    for s, depth, i, path, dec in jobs:
        res = score(ref, dec.decode_dir() / "test" / "text", bench / "score" / f"{s.name}_d{depth}_p{i}",
                    name=f"{s.name}_d{depth}_p{i}")
        wer[(s.name, depth, i)] = res.wer
    cells: Dict[Tuple[str, int], Cell] = {}
    decode_of = {(s.name, depth, i): dec for s, depth, i, _, dec in jobs}
    for s in chosen:
        for depth in args.depths:
            entries = [(i, path) for js, d, i, path, _ in jobs if js.name == s.name and d == depth]
            entries.sort(key=lambda e: (wer[(s.name, depth, e[0])], e[0]))
            mid_i, mid_path = entries[(len(entries) - 1) // 2]
            wers = [wer[(s.name, depth, i)] for i, _ in entries]
            cells[(s.name, depth)] = Cell(
                s.name, depth, [list(pth) for _, pth in entries], wers, mid_i, list(mid_path),
                wer[(s.name, depth, mid_i)], statistics.pstdev(wers) if len(wers) > 1 else 0.0)
    full = max(args.depths)
    base_key = ("baseline4", 4 if 4 in args.depths else full)
    specs = []
    for (sn, depth), cell in cells.items():
        dec = decode_of[(sn, depth, cell.median_index)]
        specs.append(SystemSpec(f"{sn}_d{depth}", dec.decode_dir()))
    base_name = f"{base_key[0]}_d{base_key[1]}"
    table = compare(specs, base_name, template.data_dir, ["test"], bench / "compare")
    base_wer = cells[base_key].median_wer
    for row in table.rows:
        sn, depth = row.spec.name.rsplit("_d", 1)
        cell = cells[(sn, int(depth))]
        sig = row.significance["test"]
        cell.verdict = verdict_text(sig)
        cell.p_value = None if sig is None else sig.p_value
        cell.rel_to_baseline = (cell.median_wer - base_wer) / base_wer if base_wer else None

    params = {s.name: build_params(exps[s.name].exp_dir / "config.yaml") for s in chosen}
    text = _markdown(chosen, cells, params, records, args, base_name, drift)
    print(text)
    atomic_write_text(out / "foldable.md", text)
    atomic_write_text(out / "foldable.json", json.dumps({
        "max_epoch": args.max_epoch, "depths": args.depths, "max_paths": args.max_paths, "baseline": base_name,
        "systems": {s.name: {"config": str(s.config), "label": s.label, "physical_blocks": s.physical,
                             "params": params[s.name], "train_seconds": records[s.name].seconds,
                             "train_cpu_seconds": records[s.name].cpu_seconds,
                             "train_time_source": records[s.name].source} for s in chosen},
        "cells": [dataclasses.asdict(c) for c in cells.values()], "config_drift": drift,
    }, indent=2) + "\n")
    _plot(chosen, cells, args.depths, out / "foldable_wer_vs_depth.png")
    return 0


def _markdown(chosen: Sequence[FoldSystem], cells: Dict, params: Dict, records: Dict, args, base_name: str,
              drift: Dict) -> str:
    depths = args.depths
    head = "| system | training | physical blocks | params | " + " | ".join(
        f"depth {d}: WER % (paths: min-max) | vs {base_name}" for d in depths) + " | train s (wall / CPU) |"
    lines = ["## Foldable Conformer: Table-4 trends on spoken_commands (test)", "", head,
             "|---|---|---:|---:|" + "---:|---|" * len(depths) + "---:|"]
    for s in chosen:
        cols = []
        for d in depths:
            c = cells[(s.name, d)]
            spread = f" ({len(c.wers)}: {min(c.wers):.2f}-{max(c.wers):.2f})" if len(c.wers) > 1 else ""
            rel = "" if c.rel_to_baseline is None or c.verdict == "baseline" else f"{c.rel_to_baseline:+.1%}, "
            cols += [f"{c.median_wer:.2f}{spread}", f"{rel}{c.verdict}"]
        lines.append(f"| {s.name} | {s.label} | {s.physical} | {params[s.name]:,} | " + " | ".join(cols) +
                     f" | {fmt_seconds(records[s.name].seconds)} / {fmt_seconds(records[s.name].cpu_seconds)} |")
    lines += [
        "",
        "WER of the median path at each executed depth (the paper reports the median); in brackets the number "
        "of paths decoded and their min-max WER. Depth below the physical block count = blocks skipped "
        "(every subset); above = blocks repeated in place by the unfolding rule (core/fold.py). Second column "
        f"per depth: relative WER change and the MAPSSWE verdict (two-sided, alpha 0.05) vs `{base_name}`. "
        f"Epochs: {'configs default' if args.max_epoch is None else args.max_epoch}; "
        f"paths per depth: {'all' if args.max_paths is None else f'at most {args.max_paths}'}.",
    ]
    if drift:
        lines += ["", f"WARNING: configs differ from the baseline outside encoder/model: {drift}"]
    return "\n".join(lines) + "\n"


def _plot(chosen: Sequence[FoldSystem], cells: Dict, depths: Sequence[int], path: Path) -> None:
    plt = plot_setup()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, s in enumerate(chosen):
        ys = [cells[(s.name, d)].median_wer for d in depths]
        lo = [min(cells[(s.name, d)].wers) for d in depths]
        hi = [max(cells[(s.name, d)].wers) for d in depths]
        marker = "o" if s.decode_encoder == "elastic_conformer" else "s"
        ax.plot(depths, ys, marker=marker, color=f"C{k}", label=f"{s.name}: {s.label}")
        ax.fill_between(depths, lo, hi, color=f"C{k}", alpha=0.15, lw=0)
    ax.set_xticks(list(depths))
    save_plot(fig, ax, path, "executed encoder depth (blocks run)", "WER (%)  [median path; band: min-max over paths]",
              "spoken_commands test: foldable Conformer", legend_size=7)


if __name__ == "__main__":
    sys.exit(main())
